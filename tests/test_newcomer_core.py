"""Issue #20, core and CLI: the default model recognised from its folder, PEFT exports that can be
shared and loaded without rewiring the shared model, and a CLI that fails in one line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperlora_integrations.model import DEFAULT_HUB_ID, _names_default, is_default_model
from hyperlora_integrations.testing import TINY_NAME

ROOT = Path(__file__).resolve().parent.parent


def random_adapter(model, seed: int = 0):
    from hyperlora_integrations.lora import Adapter

    g = torch.Generator().manual_seed(seed)
    layers, (d_in, d_out) = model.injector.num_layers, model.injector.shapes["down_proj"]
    A = {"down_proj": torch.randn(layers, 4, d_in, generator=g) * 0.1}
    B = {"down_proj": torch.randn(layers, d_out, 4, generator=g) * 0.1}
    adapter = Adapter(A, B, scaling=1.0)
    adapter.metadata.base_model = model.name
    adapter.metadata.base_fingerprint = model.fingerprint
    return adapter


# ---------------------------------------------------------------- item 5
def test_default_names_and_the_tiny_model_is_not_the_default(tiny_model, tmp_path):
    assert _names_default("SmolLM2-135M-Instruct") and _names_default(DEFAULT_HUB_ID)
    assert not _names_default(None) and not _names_default("gpt2")
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    assert not _names_default(tmp_path / "SmolLM2-135M-Instruct")  # a real folder is loaded as one
    assert not is_default_model(tiny_model.model, tiny_model.name)


@pytest.mark.slow
def test_the_cached_default_folder_and_hub_id_load_the_shipped_hypernetworks():
    from hyperlora_integrations.base_model import default_model_dir
    from hyperlora_integrations.model import HyperLoRAModel

    for spec in (default_model_dir(), str(default_model_dir()), DEFAULT_HUB_ID, "SmolLM2-135M-Instruct"):
        model = HyperLoRAModel.from_pretrained(spec)
        assert model.d2l is not None and model.t2l is not None, spec
        assert model.hub_id == DEFAULT_HUB_ID


# ---------------------------------------------------------------- item 9
def test_export_records_the_model_id_and_is_world_readable(tiny_model, tmp_path):
    adapter = random_adapter(tiny_model)
    path = tiny_model.export_adapter(adapter, tmp_path / "peft")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_NAME  # its own id, not a cache path
    mode = stat.S_IMODE(os.stat(path / "adapter_model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(path / "adapter_config.json").st_mode)
    assert mode & stat.S_IROTH


def test_to_peft_model_is_separate_and_matches(fresh_tiny_model):
    model = fresh_tiny_model
    adapter = random_adapter(model)
    ids = torch.tensor([model.encode("Hello there")])
    with torch.no_grad(), model.activate([adapter]):
        ours = model.model(input_ids=ids).logits
    with torch.no_grad():
        plain = model.model(input_ids=ids).logits
    peft_model = model.to_peft_model(adapter)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not any("lora" in name for name, _ in model.model.named_modules())  # shared model untouched
    with torch.no_grad():
        assert torch.equal(model.model(input_ids=ids).logits, plain)


def test_the_docs_name_the_separate_model_way():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "langchain.md").read_text()
    assert "to_peft_model" in text
    assert 'PeftModel.from_pretrained(base, "report-lora") works' not in text  # the old, undefined `base`
    assert "base = AutoModelForCausalLM.from_pretrained(" in text  # now defined where it is used


# ---------------------------------------------------------------- item 10
def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hyperlora_integrations.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_version_help_and_unknown_commands():
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("hyperlora ")
    assert cli("--help").returncode == 0
    unknown = cli("exprot")
    assert unknown.returncode == 2 and "did you mean 'export'" in unknown.stderr
    train = cli("train", "--help")
    assert train.returncode == 0 and "d2l" in train.stdout and "t2l" in train.stdout
    assert cli("train").returncode == 2 and cli("eval", "bogus").returncode == 2


def test_cli_help_does_not_import_torch():
    code = "import sys; from hyperlora_integrations.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("content", [None, b"", b"  \n", b"\xff\xfe\x00bad"])
def test_cli_export_checks_its_input_before_loading_a_model(tmp_path, content):
    doc = tmp_path / "doc.txt"
    if content is not None:
        doc.write_bytes(content)
    out = cli("export", str(doc), str(tmp_path / "out"))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("hyperlora export: error: ")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 8
def test_generate_accepts_one_adapter(tiny_model):
    adapter = random_adapter(tiny_model)
    one = tiny_model.generate("Hello", adapters=adapter, max_new_tokens=3)
    assert one == tiny_model.generate("Hello", adapters=[adapter], max_new_tokens=3)
