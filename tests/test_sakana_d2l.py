"""Parity of imported Sakana Doc-to-LoRA checkpoints with the LoRAs their own code generates.

The fixtures (tests/fixtures/sakana/<family>/) were made by research/sakana_fixtures/make_fixtures.py
running SakanaAI/doc-to-lora's code: a tiny random base model of each family they released for
(Gemma-2, Qwen3, Mistral), a random checkpoint in their exact format (``torch.save`` of their
state dict with their config objects, gzipped here to stay small), and the A/B tensors their
``generate_weights`` + ``combine_lora`` produced for a document, whole and split into chunks.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from peft import PeftModel
from sakana_support import ATOL, FIXTURES, expected, gunzip_checkpoint

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.errors import BaseModelMismatchError, CheckpointError
from hyperlora_integrations.hypernets.sakana_import import import_d2l

D2L_BASES = {
    "gemma2": "gemma-2-2b-it",
    "qwen3": "Qwen3-4B-Instruct-2507",
    "mistral": "Mistral-7B-Instruct-v0.2",
}


@pytest.fixture(scope="module", params=sorted(D2L_BASES))
def d2l_case(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"sakana-d2l-{family}")
    base = FIXTURES / family / D2L_BASES[family]
    out = import_d2l(gunzip_checkpoint(family, tmp).parent, tmp / "imported", base_config=base)
    model = HyperLoRAModel.from_pretrained(base, d2l=out, t2l=None)
    return family, model


def test_sakana_d2l_import_never_imports_their_code(d2l_case):
    assert not [name for name in sys.modules if name.startswith("ctx_to_lora")]


def test_sakana_d2l_single_chunk_parity(d2l_case):
    family, model = d2l_case
    tensors, meta = expected(family)
    net = model.d2l
    assert net.config.family == family and net.config.base_model == meta["base_model"]
    chunks = net.document_chunks(model.tokenizer, meta["document"])
    assert len(chunks) == 1 and chunks[0] == tensors["single.ids"].tolist()  # their template, their ids
    adapter = model.internalize(meta["document"])
    rank = net.config.lora.rank
    assert adapter.rank == 2 * rank  # the document's LoRA, then the bias LoRA
    for m in net.modules_order:
        want_a, want_b = tensors[f"single.A.{m}"], tensors[f"single.B.{m}"]
        assert torch.allclose(adapter.A[m], want_a, atol=ATOL), (m, (adapter.A[m] - want_a).abs().max())
        assert torch.allclose(adapter.B[m].transpose(1, 2), want_b, atol=ATOL), (
            m,
            (adapter.B[m].transpose(1, 2) - want_b).abs().max(),
        )
        assert want_b[:, :rank].abs().max() > 1e-3  # the fixture is not trivially zero
    # their lora_forward multiplies by lora_alpha = 2 * r ** 1.5, not alpha / r
    assert adapter.scaling == pytest.approx(2 * rank**1.5)


def test_sakana_d2l_chunked_parity(d2l_case):
    family, model = d2l_case
    tensors, meta = expected(family)
    net = model.d2l
    saved = net.config
    net.config = saved.model_copy(update={"chunk_len": meta["chunk_len"]})
    try:
        chunks = net.document_chunks(model.tokenizer, meta["document"])
        assert [c for c in chunks] == [tensors[f"chunked.ids.{i}"].tolist() for i in range(meta["n_chunks"])]
        adapter = net.internalize(model, meta["document"], bias_scaler=meta["bias_scaler"])
    finally:
        net.config = saved
    assert adapter.rank == (meta["n_chunks"] + 1) * net.config.lora.rank
    for m in net.modules_order:
        assert torch.allclose(adapter.A[m], tensors[f"chunked.A.{m}"], atol=ATOL)
        assert torch.allclose(adapter.B[m].transpose(1, 2), tensors[f"chunked.B.{m}"], atol=ATOL)


def test_sakana_d2l_peft_export_matches_engine(d2l_case, tmp_path):
    family, model = d2l_case
    _, meta = expected(family)
    adapter = model.internalize(meta["document"])
    ids = torch.tensor([model.encode("What was founded in 2023?")])
    with torch.no_grad(), model.activate([adapter]):
        ours = model.model(input_ids=ids).logits
    with torch.no_grad():
        plain = model.model(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter changes the answer
    model.export_adapter(adapter, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(model.model, str(tmp_path / "peft"))
    try:
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sakana_d2l_base_model_check(d2l_case, tmp_path):
    family, model = d2l_case
    other = "qwen3" if family != "qwen3" else "gemma2"
    with pytest.raises(BaseModelMismatchError):
        model.d2l.check_base(HyperLoRAModel.from_pretrained(FIXTURES / other / D2L_BASES[other], d2l=None, t2l=None))
    # same architecture, other name: a copy of the tiny model in a differently named folder
    renamed = tmp_path / "some-other-model"
    shutil.copytree(FIXTURES / family / D2L_BASES[family], renamed)
    with pytest.raises(BaseModelMismatchError, match="trained for"):
        model.d2l.check_base(HyperLoRAModel.from_pretrained(renamed, d2l=None, t2l=None))


def test_sakana_d2l_import_refusals(tmp_path):
    ckpt = gunzip_checkpoint("gemma2", tmp_path)
    with pytest.raises(CheckpointError, match="unknown base model|not"):
        # the tiny checkpoint is not the real gemma-2-2b-it: the built-in fingerprint disagrees
        import_d2l(ckpt, tmp_path / "out")
    with pytest.raises(CheckpointError):
        import_d2l(ckpt, tmp_path / "out", base_config=FIXTURES / "qwen3" / D2L_BASES["qwen3"])
    with pytest.raises(CheckpointError, match="no such file"):
        import_d2l(tmp_path / "nothing-here", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no pytorch_model.bin"):
        import_d2l(tmp_path / "empty", tmp_path / "out")


def test_sakana_import_cli(tmp_path):
    from hyperlora_integrations.cli import main

    ckpt = gunzip_checkpoint("mistral", tmp_path)
    base = FIXTURES / "mistral" / D2L_BASES["mistral"]
    assert main(["import", "sakana-d2l", str(ckpt), str(tmp_path / "out"), "--base-config", str(base)]) == 0
    model = HyperLoRAModel.from_pretrained(base, d2l=tmp_path / "out", t2l=None)
    assert model.d2l.config.kind == "sakana-d2l"


def test_sakana_d2l_through_retriever_and_chat(tmp_path):
    """The imported generator behind the LangChain retriever and chat model, as in docs/sakana.md."""
    from langchain_core.documents import Document

    from hyperlora_integrations.langchain import ChatHyperLoRA, HyperLoRARetriever

    base = FIXTURES / "gemma2" / D2L_BASES["gemma2"]
    out = import_d2l(gunzip_checkpoint("gemma2", tmp_path), tmp_path / "imported", base_config=base)
    model = HyperLoRAModel.from_pretrained(base, d2l=out, t2l=None)
    _, meta = expected("gemma2")
    docs = [Document(page_content=meta["document"], metadata={"source": "sakana.txt"})]
    retriever = HyperLoRARetriever.from_documents(docs, model=model, k=1, consolidate=False)
    found = retriever.invoke("When was the lab founded?")
    assert len(found) == 1 and found[0].metadata["source"] == "sakana.txt"
    chat = ChatHyperLoRA(model=model, references_from=[retriever], max_tokens=4)
    reply = chat.invoke(f"{found[0].page_content}\nWhen was the lab founded?")
    used = reply.response_metadata["adapters"]
    assert [a["id"] for a in used] == [found[0].metadata["adapter_id"]] and used[0]["kind"] == "document"
    assert reply.response_metadata["served_by"] == {used[0]["id"]: "instant"}  # the one-pass adapter
