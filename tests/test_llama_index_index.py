"""InternalizedIndex / HyperLoRARetriever on the tiny model: references in, adapters active, no text.

The central check: a stock ``RetrieverQueryEngine`` with the default response synthesizer,
given our retriever and LLM, sends the model a prompt that holds none of the documents' text,
and every forward pass runs with exactly the retrieved documents' adapters.
"""

from __future__ import annotations

import pytest
from llama_index_support import FACTS, ActiveLoRARecorder, CoreCallSpy

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.postprocessor import SimilarityPostprocessor  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeRelationship, QueryBundle  # noqa: E402

from hyperlora_integrations.adapters import AdapterStore, InternalizedCorpus  # noqa: E402
from hyperlora_integrations.adapters.references import REF_RE  # noqa: E402
from hyperlora_integrations.errors import InvalidInputError  # noqa: E402
from hyperlora_integrations.llama_index import HyperLoRALLM, HyperLoRARetriever, InternalizedIndex  # noqa: E402

# Sampled with a fixed seed: the random tiny model then emits varied tokens (greedy decoding
# mostly repeats a newline), so comparing answers with the core's says something.
SAMPLING = {"max_new_tokens": 4, "temperature": 1.0, "seed": 11}


def documents() -> list[Document]:
    return [Document(text=text, metadata={"topic": key}, doc_id=f"doc-{key}") for key, text in FACTS.items()]


def doc_fragments() -> list[str]:
    """Phrases that occur only in document text, never in the questions asked below."""
    return ["lantern festival", "ninth of March", "Arnath range", "5,120 meters", "Halcyon Drift", "2031 survey"]


@pytest.fixture()
def index(tiny_model):
    return InternalizedIndex.from_documents(
        documents(), model=tiny_model, store=AdapterStore(), namespace="facts", consolidate=False
    )


def assert_no_document_text(prompt: str) -> None:
    for fragment in doc_fragments():
        assert fragment not in prompt, f"document text {fragment!r} reached the model"
    assert "hyperlora-ref" not in prompt, "a reference reached the model as text"


def test_from_documents_internalizes_each_document(index):
    assert len(index) == 3
    metas = index.store.list(namespace="facts", kind="document")
    assert len(metas) == 3
    assert {m.model_extra["user_metadata"]["ref_doc_id"] for m in metas} == {"doc-zorblax", "doc-vellic", "doc-mirelle"}


def test_retriever_returns_references_not_text(index):
    nodes = index.as_retriever(similarity_top_k=2, min_score=None, relative_score_cutoff=None).retrieve(
        "Who commanded the vessel Halcyon?"
    )
    assert len(nodes) == 2
    top = nodes[0]
    assert top.node.metadata["topic"] == "mirelle"
    assert REF_RE.fullmatch(top.node.get_content())
    assert top.node.node_id == top.node.metadata["adapter_id"]
    assert top.node.ref_doc_id == "doc-mirelle"
    assert top.node.relationships[NodeRelationship.SOURCE].node_id == "doc-mirelle"
    assert "Halcyon Drift" in top.node.metadata["excerpt"]  # kept for display...
    llm_view = top.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "Halcyon Drift" not in llm_view and "topic: mirelle" in llm_view  # ...but not for the LLM
    assert top.score > nodes[1].score


def test_query_engine_with_swapped_retriever(index, tiny_model, monkeypatch):
    """The user's RetrieverQueryEngine, unchanged except for retriever and llm."""
    retriever = HyperLoRARetriever(index.corpus, similarity_top_k=2, relative_score_cutoff=None)
    llm = HyperLoRALLM(tiny_model, store=index.store, **SAMPLING)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm)
    question = "When is the Zorblax celebration in Quendor?"
    expected_nodes = retriever.retrieve(question)
    expected = [index.store.get(n.node.node_id, namespace="facts") for n in expected_nodes]
    assert expected_nodes[0].node.metadata["topic"] == "zorblax"

    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    with ActiveLoRARecorder(tiny_model) as rec:
        response = engine.query(question)

    assert len(spy.calls) == 1
    prompt = spy.prompt_text()
    assert question in prompt
    assert_no_document_text(prompt)
    assert spy.calls[0].adapter_ids == [a.id for a in expected]
    rec.assert_exactly(expected)
    # The answer is what the core gives for that prompt with those adapters.
    answer = tiny_model.generate(spy.calls[0].messages, expected, **SAMPLING)
    assert answer.strip() and response.response == answer
    assert [n.node.node_id for n in response.source_nodes] == [a.id for a in expected]


@pytest.mark.parametrize("mode", ["refine", "tree_summarize", "simple_summarize", "accumulate"])
def test_other_response_modes_work_unchanged(index, tiny_model, monkeypatch, mode):
    """Modes that call the LLM once per node activate each node's adapter in its own call.

    Selection is off here (``select_adapters=False``): this checks that every retrieved node's
    adapter reaches a call; which of them a call keeps is tests/test_routing.py's subject."""
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    llm = index.bound_llm(select_adapters=False, **SAMPLING)
    engine = index.as_query_engine(similarity_top_k=2, relative_score_cutoff=None, response_mode=mode, llm=llm)
    response = engine.query("Who commanded the Halcyon vessel near Quendor?")
    retrieved = [n.node.node_id for n in response.source_nodes]
    assert len(retrieved) == 2 and spy.calls
    for i, call in enumerate(spy.calls):
        assert_no_document_text(spy.prompt_text(i))
        assert set(call.adapter_ids) <= set(retrieved)
    assert {a for call in spy.calls for a in call.adapter_ids} == set(retrieved)


def test_stuffing_baseline_sends_text_where_internalized_does_not(index, tiny_model, monkeypatch):
    """Same synthesizer fed text nodes: the documents *are* in the prompt (what the swap removes)."""
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    class TextRetriever(BaseRetriever):
        def _retrieve(self, query_bundle: QueryBundle):
            return [NodeWithScore(node=TextNode(text=FACTS["zorblax"]), score=1.0)]

    llm = HyperLoRALLM(tiny_model, store=index.store, **SAMPLING)
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    RetrieverQueryEngine.from_args(TextRetriever(), llm=llm).query("When is the Zorblax celebration?")
    RetrieverQueryEngine.from_args(index.as_retriever(min_score=None, relative_score_cutoff=None), llm=llm).query(
        "When is the Zorblax celebration?"
    )
    stuffed, internalized = (spy.prompt_text(i) for i in (0, 1))
    assert "ninth of March" in stuffed
    assert_no_document_text(internalized)
    assert spy.calls[0].adapter_ids == [] and len(spy.calls[1].adapter_ids) == 2


def test_as_query_engine_defaults_and_streaming(index, tiny_model, monkeypatch):
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    engine = index.as_query_engine(similarity_top_k=1, streaming=True, llm=index.bound_llm(**SAMPLING))
    streaming = engine.query("How high is Mount Vellic?")
    text = "".join(streaming.response_gen)
    vellic = index.store.get(streaming.source_nodes[0].node.node_id, namespace="facts")
    assert streaming.source_nodes[0].node.metadata["topic"] == "vellic"
    assert spy.calls[-1].adapter_ids == [vellic.id]
    assert_no_document_text(spy.prompt_text())
    assert text == tiny_model.generate(spy.calls[-1].messages, [vellic], **SAMPLING)


async def test_async_query(index, tiny_model, monkeypatch):
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    engine = index.as_query_engine(similarity_top_k=1, llm=index.bound_llm(**SAMPLING))
    response = await engine.aquery("Who was captain of the research vessel?")
    assert response.source_nodes[0].node.metadata["topic"] == "mirelle"
    assert spy.calls[-1].adapter_ids == [response.source_nodes[0].node.node_id]
    assert_no_document_text(spy.prompt_text())


def test_as_query_engine_llm_resolution(index, tiny_model):
    previous = Settings._llm
    try:
        # A store-less HyperLoRALLM in Settings (the stuffing baseline's) is rebound, settings kept.
        Settings.llm = HyperLoRALLM(tiny_model, max_new_tokens=3, temperature=0.5)
        engine = index.as_query_engine()
        llm = engine._response_synthesizer._llm
        assert isinstance(llm, HyperLoRALLM) and llm.max_new_tokens == 3 and llm.temperature == 0.5
        assert llm.accepts_references_from(index.store, "facts")
        # Not a HyperLoRALLM in Settings: one bound to the index is built.
        Settings.llm = MockLLM()
        assert index.as_query_engine()._response_synthesizer._llm.accepts_references_from(index.store, "facts")
    finally:
        Settings._llm = previous
    with pytest.raises(InvalidInputError, match="cannot read this index's references"):
        index.as_query_engine(llm=MockLLM())
    with pytest.raises(InvalidInputError, match="would reject references"):
        index.as_query_engine(llm=HyperLoRALLM(tiny_model, store=AdapterStore()))
    with pytest.raises(InvalidInputError, match="would reject references"):
        index.as_query_engine(llm=HyperLoRALLM(tiny_model, store=index.store, namespaces=["other"]))


def test_insert_makes_a_document_retrievable_and_active(index, tiny_model, monkeypatch):
    new = Document(text="The Brisk Otter ferry crosses Lake Temmin twice a day.", doc_id="doc-ferry")
    ids = index.insert(new)
    assert len(ids) == 1 and len(index) == 4
    assert index.insert(new) == ids and len(index) == 4  # same text: not internalized twice
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    engine = index.as_query_engine(similarity_top_k=1, llm=index.bound_llm(**SAMPLING))
    with ActiveLoRARecorder(tiny_model) as rec:
        response = engine.query("How often does the Otter ferry cross Lake Temmin?")
    assert response.source_nodes[0].node.node_id == ids[0]
    assert response.source_nodes[0].node.ref_doc_id == "doc-ferry"
    rec.assert_exactly([index.store.get(ids[0], namespace="facts")])
    assert "twice a day" not in spy.prompt_text()


def test_delete_forgets_adapters(index):
    top = index.as_retriever(similarity_top_k=1).retrieve("Mount Vellic height")[0]
    index.delete([top.node.node_id])
    assert len(index) == 2
    assert all(
        n.node.node_id != top.node.node_id
        for n in index.as_retriever(similarity_top_k=3, relative_score_cutoff=None).retrieve("Vellic")
    )


def test_transformations_split_documents(tiny_model):
    long_doc = Document(text=" ".join(f"Sentence {i} talks about topic{i}." for i in range(60)), doc_id="long")
    index = InternalizedIndex.from_documents(
        [long_doc], model=tiny_model, transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=0)]
    )
    assert len(index) > 1
    nodes = index.as_retriever(similarity_top_k=1).retrieve("topic42")
    assert "topic42" in nodes[0].node.metadata["excerpt"]
    assert nodes[0].node.ref_doc_id == "long"


def test_persistent_store_reopens_without_reinternalizing(tiny_model, tmp_path, monkeypatch):
    InternalizedIndex.from_documents(documents(), model=tiny_model, store=AdapterStore(tmp_path), namespace="facts")

    def fail(*args, **kwargs):
        raise AssertionError("internalized again")

    monkeypatch.setattr(tiny_model, "internalize", fail)
    reopened = InternalizedIndex.from_documents(
        documents(), model=tiny_model, store=AdapterStore(tmp_path), namespace="facts"
    )
    assert len(reopened) == 3
    assert reopened.as_retriever(similarity_top_k=1).retrieve("Zorblax")[0].node.metadata["topic"] == "zorblax"


def test_similarity_cutoff_postprocessor_drops_unrelated_adapters(index, tiny_model, monkeypatch):
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    engine = index.as_query_engine(
        similarity_top_k=3,
        llm=index.bound_llm(**SAMPLING),
        node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=0.01)],
    )
    response = engine.query("Zorblax lanterns")
    assert [n.node.metadata["topic"] for n in response.source_nodes] == ["zorblax"]
    assert len(spy.calls[-1].adapter_ids) == 1


def test_bad_inputs(tiny_model, index):
    with pytest.raises(InvalidInputError):
        InternalizedIndex.from_documents(Document(text="x"), model=tiny_model)
    with pytest.raises(InvalidInputError):
        index.insert("plain string")
    with pytest.raises(InvalidInputError):
        HyperLoRARetriever(index.corpus, similarity_top_k=0)
    with pytest.raises(InvalidInputError):
        HyperLoRARetriever(InternalizedCorpus, similarity_top_k=1)
