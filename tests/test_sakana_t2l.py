"""Parity of imported Sakana Text-to-LoRA checkpoints with the LoRAs their own code generates.

Fixtures (tests/fixtures/sakana/<family>/t2l/) were made by research/sakana_fixtures/make_fixtures.py
running SakanaAI/text-to-lora's code: a random ``hypermod.pt`` + ``args.yaml`` +
``adapter_config.json`` per family they released for (Mistral, Llama-3.1, Gemma-2) and, on Gemma-2,
per head size (L: all ranks at once, M: shared A/B head, S: one rank at a time with a learned or
a rotary position). Expected tensors: their ``gen_lora`` PEFT state dict for one description
embedded by their ``embed_texts`` (base model, last token) and for a fixed hidden state pooled
like gte (CLS), the sentence encoder their releases use.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from sakana_support import ATOL, FIXTURES, expected, t2l_run

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.errors import CheckpointError
from hyperlora_integrations.hypernets.sakana_import import convert_t2l, import_t2l
from hyperlora_integrations.hypernets.sakana_t2l import SakanaTextToLoRA

T2L_BASES = {"mistral": "Mistral-7B-Instruct-v0.2", "llama": "Llama-3.1-8B-Instruct", "gemma2": "gemma-2-2b-it"}
CASES = [(f, v) for f in sorted(T2L_BASES) for v in (["L", "M", "S-pos", "S-rope"] if f == "gemma2" else ["L"])]
_KEY = re.compile(r"layers\.(\d+)\..*\.(\w+)\.lora_([AB])\.weight$")


def their_lora(tensors: dict[str, torch.Tensor], prefix: str) -> dict[tuple[str, str], torch.Tensor]:
    """Their PEFT state dict -> ``{(module, "A"|"B"): (L, ...)}`` stacked over layers."""
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix) and (match := _KEY.search(key)):
            layer, module, ab = match.groups()
            found.setdefault((module, ab), {})[int(layer)] = value
    return {k: torch.stack([v[i] for i in sorted(v)]) for k, v in found.items()}


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_sakana_t2l_parity(family, variant, tmp_path):
    tensors, meta = expected(family, "t2l")
    info = meta["variants"][variant]
    base_dir = FIXTURES / family / T2L_BASES[family]
    out = import_t2l(
        t2l_run(family, info["dir"], tmp_path),
        tmp_path / "t2l",
        base_config=base_dir,
        module_order=info["module_order"],
    )
    model = HyperLoRAModel.from_pretrained(base_dir, d2l=None, t2l=out)
    net = model.t2l
    assert isinstance(net, SakanaTextToLoRA) and list(net.modules_order) == info["module_order"]

    # description -> their embedding (base model, add_full_stop, last token, normalised)
    emb = net.embed(model, meta["description"])
    assert torch.allclose(emb, tensors[f"{variant}.text.task_emb"], atol=ATOL)
    adapter = model.generate_skill(meta["description"])
    want = their_lora(tensors, f"{variant}.text.")
    assert set(want) == {(m, ab) for m in net.modules_order for ab in "AB"}
    for m in net.modules_order:
        assert torch.allclose(adapter.A[m], want[(m, "A")], atol=ATOL), (m, (adapter.A[m] - want[(m, "A")]).abs().max())
        assert torch.allclose(adapter.B[m], want[(m, "B")], atol=ATOL), (m, (adapter.B[m] - want[(m, "B")]).abs().max())
        assert want[(m, "B")].abs().max() > 1e-3
    # PEFT's scale with rsLoRA, as in their adapter_config.json: alpha / r * sqrt(r)
    rank = net.config.lora.rank
    assert adapter.scaling == pytest.approx(16 / rank * rank**0.5)

    # a gte-style sentence encoder: CLS token of its last hidden state, normalised the same way
    cls = SakanaTextToLoRA.normalize(tensors[f"{variant}.cls.hidden"][0])
    A, B = net(cls)
    want = their_lora(tensors, f"{variant}.cls.")
    for m in net.modules_order:
        assert torch.allclose(A[m], want[(m, "A")], atol=ATOL)
        assert torch.allclose(B[m], want[(m, "B")], atol=ATOL)


def test_sakana_t2l_module_order_matters(tmp_path):
    """Their layer-type index follows Python's set order; the fixture's run had v_proj first."""
    tensors, meta = expected("gemma2", "t2l")
    info = meta["variants"]["L"]
    assert info["module_order"] != sorted(info["module_order"])
    base_dir = FIXTURES / "gemma2" / T2L_BASES["gemma2"]
    net = convert_t2l(t2l_run("gemma2", info["dir"], tmp_path), base_config=base_dir)  # default: sorted
    assert list(net.modules_order) == sorted(info["module_order"])
    A, _ = net(SakanaTextToLoRA.normalize(tensors["L.cls.hidden"][0]))
    want = their_lora(tensors, "L.cls.")
    assert not torch.allclose(A["q_proj"], want[("q_proj", "A")], atol=1e-3)


def test_sakana_t2l_peft_export_matches_engine(tmp_path):
    tensors, meta = expected("mistral", "t2l")
    info = meta["variants"]["L"]
    base_dir = FIXTURES / "mistral" / T2L_BASES["mistral"]
    out = import_t2l(
        t2l_run("mistral", info["dir"], tmp_path),
        tmp_path / "t2l",
        base_config=base_dir,
        module_order=info["module_order"],
    )
    model = HyperLoRAModel.from_pretrained(base_dir, d2l=None, t2l=out)
    adapter = model.generate_skill(meta["description"])
    ids = torch.tensor([model.encode("What is 12 times 7?")])
    with torch.no_grad(), model.activate([adapter]):
        ours = model.model(input_ids=ids).logits
    model.export_adapter(adapter, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(model.model, str(tmp_path / "peft"))
    try:
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sakana_t2l_import_refusals(tmp_path):

    run = t2l_run("gemma2", "t2l/gemma_2b_t2l", tmp_path)
    base_dir = FIXTURES / "gemma2" / T2L_BASES["gemma2"]
    args = (run / "args.yaml").read_text()
    (run / "args.yaml").write_text(args.replace("encoder_type: linear", "encoder_type: vq"))
    with pytest.raises(CheckpointError, match="task encoder"):
        convert_t2l(run, base_config=base_dir)
    (run / "args.yaml").write_text(args.replace("emb_model: ''", "emb_model: Salesforce/SFR-Embedding-2_R"))
    with pytest.raises(CheckpointError, match="description encoder"):
        convert_t2l(run, base_config=base_dir)
    (run / "args.yaml").write_text(args)
    with pytest.raises(CheckpointError):  # the real gemma-2-2b-it's sizes are not the tiny model's
        convert_t2l(run)
    (run / "args.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(CheckpointError, match="args.yaml"):
        convert_t2l(run, base_config=base_dir)
