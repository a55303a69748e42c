"""Adapter selection by question likelihood (adapters/routing.py): k retrieved, the relevant kept.

The greedy rule is checked exactly with a scripted likelihood; on the tiny model, an adapter
consolidated on a text that is the question is kept and another document's is skipped, in the
core resolution and through ChatHyperLoRA and HyperLoRALLM (``select_adapters=False`` keeps all).
"""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from hyperlora_integrations.adapters import InternalizedCorpus, ReferenceResolver, routing
from hyperlora_integrations.consolidation import ConsolidationConfig

QUESTION = "What colour is the lantern that Miriel Vost keeps above the harbour gate?"
OTHER = "The Quorran rail bridge opened in 1911 and carried coal trains between Attel and Brimwick."
FIT = ConsolidationConfig(steps=15, batch_size=2, max_seq_tokens=96, lr=3e-2)


def test_greedy_selection_adds_an_adapter_only_when_it_makes_the_question_more_likely(monkeypatch):
    table = {("a",): 10.0, ("b",): 12.0, ("c",): 20.0, ("a", "b"): 8.0, ("a", "b", "c"): 8.5, ("a", "c"): 11.0}
    monkeypatch.setattr(routing, "question_nll", lambda model, text, adapters: table[tuple(sorted(adapters))])
    assert routing.select(None, "q", ["c", "a", "b"]) == [1, 2]  # a first, then b (8 < 10); c raises it
    assert routing.select(None, "q", ["c", "a", "b"], margin=2.5) == [1]  # b's 2 nats are under the margin
    assert routing.select(None, "q", ["c"]) == [0]  # one adapter: nothing to choose
    assert routing.select(None, "  ", ["c", "a"]) == [0, 1]  # no question: nothing to judge by


@pytest.fixture(scope="module")
def two_documents(tmp_path_factory):
    from hyperlora_integrations.adapters import AdapterStore

    model = make_tiny_model()
    store = AdapterStore(tmp_path_factory.mktemp("routing") / "store")
    corpus = InternalizedCorpus(model, store, namespace="docs")
    ids = corpus.add_texts([QUESTION, OTHER], consolidate=False)
    for doc_id, text in zip(ids, [QUESTION, OTHER], strict=True):
        adapter = model.consolidate(text, config=FIT, seed=1)
        adapter.metadata.id = doc_id
        store.put(adapter, namespace="docs", text=text)
    refs = [corpus.search(text, k=1)[0].reference for text in (QUESTION, OTHER)]
    yield model, store, ids, refs
    store.close()


def test_the_adapter_that_explains_the_question_is_kept(two_documents):
    model, store, (own, other), refs = two_documents
    nll_own = routing.question_nll(model, QUESTION, [store.get(own, namespace="docs")])
    nll_other = routing.question_nll(model, QUESTION, [store.get(other, namespace="docs")])
    assert nll_own < nll_other
    message = [{"role": "user", "content": f"Context: {refs[1]} {refs[0]}\n{QUESTION}"}]
    resolution = ReferenceResolver(store, namespaces=["docs"]).resolve(message)
    assert [a.id for a in resolution.adapters] == [other, own]
    routed = routing.route(model, resolution, QUESTION)
    assert [a.id for a in routed.adapters] == [own]
    assert [r.adapter_id for r in routed.adapter_references] == [own]
    assert routed.served_by == {own: "consolidated", other: routing.SKIPPED}
    assert routing.route(model, resolution, None) is resolution


def test_chat_model_and_llm_select_adapters_by_default(two_documents):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.messages import HumanMessage
    from llama_index.core.base.llms.types import ChatMessage

    from hyperlora_integrations.langchain import ChatHyperLoRA
    from hyperlora_integrations.llama_index import HyperLoRALLM

    model, store, (own, other), refs = two_documents
    text = f"Context: {refs[1]} {refs[0]}\n{QUESTION}"
    chat = ChatHyperLoRA(model=model, adapter_store=store, reference_namespaces=["docs"], max_tokens=2)
    served = chat.invoke([HumanMessage(text)]).response_metadata["served_by"]
    assert served == {own: "consolidated", other: routing.SKIPPED}
    every = chat.model_copy(update={"select_adapters": False})
    assert every.invoke([HumanMessage(text)]).response_metadata["served_by"] == {
        own: "consolidated",
        other: "consolidated",
    }
    llm = HyperLoRALLM(model, store=store, namespaces=["docs"], max_new_tokens=2)
    out = llm.chat([ChatMessage(role="user", content=text)])
    assert out.raw["served_by"] == {own: "consolidated", other: routing.SKIPPED}


def test_serving_engine_selects_among_referenced_adapters(two_documents):
    from hyperlora_integrations.serving.engine import ServingEngine
    from hyperlora_integrations.serving.schemas import ChatCompletionRequest

    model, store, (own, other), refs = two_documents
    body = {"model": model.name, "max_tokens": 2}
    body["messages"] = [{"role": "user", "content": f"Context: {refs[1]} {refs[0]}\n{QUESTION}"}]
    req = ChatCompletionRequest.model_validate(body)
    for select, expected in ((True, {own: "consolidated", other: routing.SKIPPED}), (False, None)):
        engine = ServingEngine(model, store, namespaces=["docs"], select_adapters=select)
        plan = engine.plan(req, engine.targets(req.model), [])
        if expected is None:
            assert sorted(a.id for a in plan.adapters) == sorted([own, other])
        else:
            assert [a.id for a in plan.adapters] == [own] and plan.served_by == expected
