"""Regression tests of issue #19 (hostile-input review) for the file formats: safetensors
headers, adapter scaling, PEFT directories and hypernetwork checkpoints.

Every case here was an untyped exception, a hang, an unbounded read, a leak or silent
corruption before the fix; each must now be a ``HyperLoRAError`` (or load correctly).
docs/reliability.md lists them with the guarantee each backs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from hyperlora_integrations.errors import CheckpointError, InvalidInputError, UnsafeFileError
from hyperlora_integrations.hypernets import checkpoint
from hyperlora_integrations.lora import Adapter, AdapterMetadata, load_peft


def fitting_adapter(model, *, rank: int = 4, seed: int = 0, **meta) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = model.injector.shapes["down_proj"]
    n = model.injector.num_layers
    return Adapter(
        {"down_proj": torch.randn(n, rank, d_in, generator=g) * 0.1},
        {"down_proj": torch.randn(n, d_out, rank, generator=g) * 0.1},
        metadata=AdapterMetadata(base_model=model.name, base_fingerprint=model.fingerprint, **meta),
    )


def forged(header: object, body: bytes = b"\x00" * 16) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def with_scaling(adapter: Adapter, scaling: str) -> bytes:
    """``adapter.to_bytes()`` with the header's scaling replaced (what a tampered blob holds)."""
    tensors = {}
    for name in adapter.A:
        tensors[f"{name}.A"], tensors[f"{name}.B"] = adapter.A[name].contiguous(), adapter.B[name].contiguous()
    header = {
        "format": "hyperlora-adapter",
        "format_version": "1",
        "scaling": scaling,
        "metadata": adapter.metadata.model_dump_json(),
    }
    return st_save(tensors, metadata=header)


# ---------------------------------------------------------------------- 6. crafted safetensors headers
ENTRY = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "data",
    [
        forged(b'{"x.A": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}'),  # OverflowError
        forged({"x.A": {**ENTRY, "data_offsets": "ab"}}),  # TypeError
        forged({"x.A": {**ENTRY, "data_offsets": [None, 4]}}),  # TypeError
        forged({"x.A": {**ENTRY, "data_offsets": [0, 16, 32]}}),
        forged({"x.A": {**ENTRY, "shape": [True, 4]}}),
        forged({"x.A": {**ENTRY, "dtype": ["F32"]}}),  # unhashable dtype: TypeError
        forged({"__metadata__": ["format", "hyperlora-adapter"], "x.A": ENTRY}),  # AttributeError
        forged({"__metadata__": {"format": 1}, "x.A": ENTRY}),
        forged(b"[" * 200_000 + b"]" * 200_000),  # RecursionError
        forged(b'{"x.A": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 16]}}'),  # int digits
    ],
    ids=[
        "shape-1e400",
        "offsets-str",
        "offsets-null",
        "offsets-three",
        "shape-bool",
        "dtype-list",
        "metadata-list",
        "metadata-int-value",
        "200k-deep",
        "5000-digit-int",
    ],
)
def test_crafted_safetensors_headers_give_checkpoint_error(data):
    with pytest.raises(CheckpointError):
        Adapter.from_bytes(data)


def test_error_message_does_not_leak_the_files_bytes_or_size(tmp_path):
    """Pointing a loader at a non-safetensors file used to report its first 8 bytes (as an int)
    and its size: a way of reading files the caller should not see."""
    secret = b"hunter2!" + b"top secret payload" * 3
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(secret)
    with pytest.raises(CheckpointError) as info:
        Adapter.load(target)
    message = str(info.value)
    assert str(int.from_bytes(secret[:8], "little")) not in message
    assert str(len(secret)) not in message and "hunter2" not in message


# ---------------------------------------------------------------------- 4. NaN / inf / absurd scaling
@pytest.mark.parametrize("scaling", ["nan", "inf", "-inf", "1e300"])
def test_non_finite_or_absurd_scaling_in_a_file_is_refused(tiny_model, scaling):
    with pytest.raises(CheckpointError):
        Adapter.from_bytes(with_scaling(fitting_adapter(tiny_model), scaling))


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), 1e300, "abc", None])
def test_non_finite_scaling_is_refused_on_construction_and_assignment(tiny_model, scaling):
    a = fitting_adapter(tiny_model)
    with pytest.raises(InvalidInputError):
        Adapter(a.A, a.B, scaling=scaling)
    with pytest.raises(InvalidInputError):
        a.scaling = scaling
    assert a.scaling == 1.0  # unchanged


def test_store_holding_a_nan_scaled_blob_fails_verify(tiny_model, store):
    adapter = fitting_adapter(tiny_model, id="doc")
    store.put(adapter)
    blob = next((store.path / "blobs" / "default").iterdir())
    blob.write_bytes(with_scaling(adapter, "nan"))
    problems = store.verify()
    assert len(problems) == 1 and "default/doc" in problems[0]


def test_verify_lists_a_tampered_blob_instead_of_raising(tiny_model, store):
    adapter = fitting_adapter(tiny_model, id="doc")
    store.put(adapter)
    store.put(fitting_adapter(tiny_model, id="fine", seed=1))
    blob = next(p for p in (store.path / "blobs" / "default").iterdir() if p.name.startswith("doc."))
    blob.write_bytes(forged({"x.A": {**ENTRY, "data_offsets": "ab"}}))
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("default/doc:")
    assert len(store.verify(load=False)) == 1  # the header check alone finds it too


# ---------------------------------------------------------------------- 3./6. PEFT directories
@pytest.fixture()
def peft_dir(tiny_model, tmp_path):
    path = tmp_path / "peft"
    tiny_model.export_adapter(fitting_adapter(tiny_model), path)
    return path


def _config(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "change",
    [
        lambda c: [],
        lambda c: {**c, "lora_alpha": "abc"},
        lambda c: {**c, "lora_alpha": None},
        lambda c: {**c, "lora_alpha": float("nan")},
        lambda c: {**c, "lora_alpha": 1e300},
        lambda c: {**c, "lora_alpha": 10**400},
        lambda c: {**c, "base_model_name_or_path": 5},
    ],
    ids=["list", "alpha-str", "alpha-null", "alpha-nan", "alpha-1e300", "alpha-huge-int", "base-int"],
)
def test_bad_peft_configs_give_checkpoint_error(tiny_model, peft_dir, change):
    (peft_dir / "adapter_config.json").write_text(json.dumps(change(_config(peft_dir))))
    with pytest.raises(CheckpointError):
        tiny_model.load_adapter(peft_dir)
    with pytest.raises(CheckpointError):
        load_peft(peft_dir)


def _rewrite_weights(path, edit) -> None:
    from safetensors.torch import load_file

    state = load_file(path / "adapter_model.safetensors")
    save_file(edit(state), path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: {k: v for k, v in s.items() if "lora_B" in k},  # only lora_B: KeyError
        lambda s: {k: (v[0] if "lora_A" in k else v) for k, v in s.items()},  # 1-D lora_A: IndexError
        lambda s: {k: (v.to(torch.int32) if "lora_A" in k else v) for k, v in s.items()},
        lambda s: {**s, "base_model.model.model.layers.99999999.mlp.down_proj.lora_A.weight": torch.zeros(4, 8)},
    ],
    ids=["only-B", "1d-A", "int-weights", "layer-1e8"],
)
def test_bad_peft_weights_give_checkpoint_error(tiny_model, peft_dir, edit):
    _rewrite_weights(peft_dir, edit)
    with pytest.raises(CheckpointError):
        tiny_model.load_adapter(peft_dir)
    with pytest.raises(CheckpointError):
        load_peft(peft_dir)  # without an injector the layer count comes from the file


@pytest.mark.parametrize("content", ['{"source": 123}', "[1, 2]", "{broken", ""])
def test_bad_hyperlora_metadata_gives_checkpoint_error(tiny_model, peft_dir, content):
    (peft_dir / "hyperlora_metadata.json").write_text(content)
    with pytest.raises(CheckpointError):
        tiny_model.load_adapter(peft_dir)


def test_peft_weights_symlinked_out_of_the_directory_are_refused(tiny_model, peft_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(peft_dir / "adapter_model.safetensors", outside)
    os.symlink(outside, peft_dir / "adapter_model.safetensors")
    with pytest.raises(UnsafeFileError):
        tiny_model.load_adapter(peft_dir)
    # a link inside the directory, and the Hugging Face cache layout, still load
    os.unlink(peft_dir / "adapter_model.safetensors")
    os.replace(outside, peft_dir / "weights.real")
    os.symlink("weights.real", peft_dir / "adapter_model.safetensors")
    assert tiny_model.load_adapter(peft_dir).rank == 4
    repo = tmp_path / "models--x--y"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "weights.real"):
        os.replace(peft_dir / name, repo / "blobs" / name)
    os.symlink("../../blobs/adapter_config.json", snapshot / "adapter_config.json")
    os.symlink("../../blobs/weights.real", snapshot / "adapter_model.safetensors")
    assert tiny_model.load_adapter(snapshot).rank == 4


def test_peft_config_fifo_is_refused_without_hanging(tiny_model, peft_dir):
    config = peft_dir / "adapter_config.json"
    config.unlink()
    os.mkfifo(config)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            tiny_model.load_adapter(peft_dir)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # the old code blocks in open(); a writer that closes at once frees it
        os.close(os.open(config, os.O_RDWR))
        thread.join(10)
        pytest.fail("load_adapter blocked on a FIFO adapter_config.json")
    assert isinstance(outcome[0], CheckpointError), outcome


DEV_ZERO_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))
    from hyperlora_integrations.lora import load_peft
    from hyperlora_integrations.errors import CheckpointError
    path = sys.argv[1]
    for name in ("adapter_config.json", "hyperlora_metadata.json", "adapter_model.safetensors"):
        real = os.path.join(path, name)
        os.replace(real, real + ".orig")
        os.symlink("/dev/zero", real)
        try:
            load_peft(path)
            print(name, "LOADED")
        except CheckpointError:
            print(name, "CheckpointError")
        except BaseException as exc:
            print(name, type(exc).__name__)
        os.unlink(real)
        os.replace(real + ".orig", real)
    """
)


def test_peft_files_symlinked_to_dev_zero_are_refused_without_reading(peft_dir):
    """``/dev/zero`` as config, metadata or weights: refused at once (the old code read it until
    out of memory; the child runs under a 3 GiB data limit so a regression cannot take the host)."""
    out = subprocess.run(
        [sys.executable, "-c", DEV_ZERO_SCRIPT, str(peft_dir)], capture_output=True, text=True, timeout=300
    )
    lines = out.stdout.split("\n")
    assert [line.split()[-1] for line in lines if line] == ["CheckpointError"] * 3, out.stdout + out.stderr


# ---------------------------------------------------------------------- 6. hypernetwork config sizes
def _tiny_checkpoint(tiny_model, tmp_path):
    from hyperlora_integrations.hypernets import DocToLoRA

    net = DocToLoRA.for_model(tiny_model, latent_dim=16, num_latents=2, num_blocks=1)
    return checkpoint.save(net, tmp_path / "net")


@pytest.mark.parametrize(
    "change",
    [
        # the review's 393-byte config: widths that would allocate ~32 TB (now over the bounds)
        {"hidden_size": 2**22, "latent_dim": 2**16, "module_shapes": {"down_proj": [2**22, 2**22]}},
        # within every bound but ~1 TB of parameters: refused by comparing with the weights file
        {"hidden_size": 2**17, "latent_dim": 2**14, "module_shapes": {"down_proj": [2**17, 2**17]}},
        {"latent_dim": 18, "num_heads": 4},  # heads do not divide the width: AssertionError in torch
    ],
    ids=["32TB", "1TB-within-bounds", "heads"],
)
def test_oversized_hypernetwork_config_is_refused_before_allocation(tiny_model, tmp_path, change):
    path = _tiny_checkpoint(tiny_model, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB


def test_hypernetwork_checkpoint_still_round_trips(tiny_model, tmp_path):
    path = _tiny_checkpoint(tiny_model, tmp_path)
    net = checkpoint.load(path)
    assert net.config.latent_dim == 16 and sum(p.numel() for p in net.parameters()) > 0
