"""Issue #20, LlamaIndex side: what a newcomer hit, each as a test on the tiny model.

Metadata filters are honoured (no cross-tenant leak), the retriever agrees with LangChain's on
empty results, ``InternalizedIndex`` takes what ``VectorStoreIndex`` users pass and call,
``HyperLoRALLM`` refuses unknown arguments and accepts model names, the skill tool matches
LangChain's.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings  # noqa: E402
from llama_index.core.vector_stores import FilterOperator, MetadataFilter, MetadataFilters  # noqa: E402

from hyperlora_integrations.adapters import AdapterStore  # noqa: E402
from hyperlora_integrations.errors import AdapterNotFoundError, InvalidInputError  # noqa: E402
from hyperlora_integrations.llama_index import HyperLoRALLM, InternalizedIndex, skill_tool  # noqa: E402
from hyperlora_integrations.skills import SkillLibrary  # noqa: E402

DOCS = [
    Document(text="The cat sat on the mat in Lisbon.", metadata={"tenant": "a", "year": 2021}, id_="cat"),
    Document(text="The dog slept on the rug in Oslo.", metadata={"tenant": "b", "year": 2022}, id_="dog"),
    Document(text="A cat and a dog shared the garden.", metadata={"tenant": "b", "year": 2023}, id_="both"),
]
TENANT_A = MetadataFilters(filters=[MetadataFilter(key="tenant", value="a")])


@pytest.fixture()
def llm(tiny_model):
    return HyperLoRALLM(tiny_model, max_new_tokens=3)


@pytest.fixture()
def index(tiny_model):
    return InternalizedIndex.from_documents(DOCS, model=tiny_model)


# ---------------------------------------------------------------- item 2: filters
def test_retriever_filters_never_return_another_tenant(index):
    nodes = index.as_retriever(similarity_top_k=2, filters=TENANT_A, relative_score_cutoff=None).retrieve(
        "dog slept rug Oslo cat"
    )
    assert [n.metadata["tenant"] for n in nodes] == ["a"]
    unfiltered = index.as_retriever(similarity_top_k=3, relative_score_cutoff=None).retrieve("dog slept rug Oslo cat")
    assert {n.metadata["tenant"] for n in unfiltered} == {"a", "b"}


def test_filter_operators_and_doc_ids(index):
    recent = MetadataFilters(filters=[MetadataFilter(key="year", value=2022, operator=FilterOperator.GTE)])
    assert {n.node.ref_doc_id for n in index.as_retriever(filters=recent).retrieve("cat dog")} == {"dog", "both"}
    only = index.as_retriever(similarity_top_k=3, doc_ids=["both"]).retrieve("cat dog")
    assert [n.node.ref_doc_id for n in only] == ["both"]


def test_query_engine_filters_reach_the_llm(index, llm, tiny_model, monkeypatch):
    engine = index.as_query_engine(llm=llm.with_store(index.store, [index.namespace]), filters=TENANT_A)
    response = engine.query("Where did the dog sleep? dog rug Oslo cat")
    assert [n.metadata["tenant"] for n in response.source_nodes] == ["a"]
    assert response.metadata is not None or response.source_nodes


# ---------------------------------------------------------------- item 6: empty results
def test_retriever_returns_nothing_when_no_term_matches(index):
    assert index.as_retriever().retrieve("zebra quantum") == []
    assert len(index.as_retriever(min_score=None, similarity_top_k=2).retrieve("zebra quantum")) == 2


# ---------------------------------------------------------------- item 7: VectorStoreIndex surface
def test_from_documents_accepts_vector_index_arguments_and_refuses_unknown_ones(tiny_model):
    index = InternalizedIndex.from_documents(DOCS[:1], model=tiny_model, embed_model="local", storage_context=None)
    assert len(index) == 1
    with pytest.raises(TypeError, match="did you mean 'embed_model'"):
        InternalizedIndex.from_documents(DOCS[:1], model=tiny_model, embedmodel="local")
    with pytest.raises(TypeError, match="'simlarity_top_k'"):
        index.as_retriever(simlarity_top_k=1)
    assert index.as_retriever(vector_store_query_mode="default", alpha=0.5).similarity_top_k == 2


def test_from_documents_takes_the_model_of_settings_llm(tiny_model, monkeypatch):
    monkeypatch.setattr(Settings, "_llm", HyperLoRALLM(tiny_model))
    assert InternalizedIndex.from_documents(DOCS[:1]).model is tiny_model
    monkeypatch.setattr(Settings, "_llm", None)
    with pytest.raises(InvalidInputError, match="model="):
        InternalizedIndex.from_documents(DOCS[:1])


def test_chat_engines(index, llm):
    bound = llm.with_store(index.store, [index.namespace])
    for mode, kind in [
        ("best", "CondensePlusContextChatEngine"),
        ("context", "ContextChatEngine"),
        ("condense_question", "CondenseQuestionChatEngine"),
        ("simple", "SimpleChatEngine"),
    ]:
        engine = index.as_chat_engine(chat_mode=mode, llm=bound, similarity_top_k=1)
        assert type(engine).__name__ == kind
        assert isinstance(engine.chat("Where did the cat sit?").response, str)
    with pytest.raises(InvalidInputError, match="chat_mode"):
        index.as_chat_engine(chat_mode="react", llm=bound)


def test_delete_and_refresh_ref_docs(index):
    assert index.ref_doc_ids == ["both", "cat", "dog"]
    index.delete_ref_doc("cat")
    assert index.ref_doc_ids == ["both", "dog"] and len(index) == 2
    assert index.as_retriever().retrieve("mat Lisbon") == []
    changed = Document(text="The dog slept on the sofa in Oslo.", metadata={"tenant": "b", "year": 2022}, id_="dog")
    assert index.refresh_ref_docs([DOCS[0], changed, DOCS[2]]) == [True, True, False]
    assert index.ref_doc_ids == ["both", "cat", "dog"] and len(index) == 3
    assert [n.node.ref_doc_id for n in index.as_retriever(similarity_top_k=1).retrieve("sofa")] == ["dog"]
    assert index.as_retriever().retrieve("rug") == []  # the old version is gone
    with pytest.raises(TypeError):
        index.delete_ref_doc("dog", delete_from_dokstore=True)


def test_storage_context_persist(index, tmp_path):
    index.storage_context.persist()  # written through already
    index.storage_context.persist(persist_dir=str(index.store.path))
    with pytest.raises(InvalidInputError, match="store=AdapterStore"):
        index.storage_context.persist(persist_dir=str(tmp_path / "elsewhere"))


# ---------------------------------------------------------------- items 1 and 8: the LLM
def test_llm_constructor_arguments(tiny_model):
    assert HyperLoRALLM(tiny_model, max_tokens=5).max_new_tokens == 5
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        HyperLoRALLM(tiny_model, temprature=0.3)
    with pytest.raises(TypeError, match="not both"):
        HyperLoRALLM(tiny_model, max_tokens=5, max_new_tokens=6)
    llm = HyperLoRALLM(tiny_model, generate_kwargs={"top_k": 3})
    assert llm.generate_kwargs == {"top_k": 3}
    with pytest.raises(TypeError, match="top_kk"):
        HyperLoRALLM(tiny_model, generate_kwargs={"top_kk": 3})


def test_llm_accepts_a_model_name_like_chat_hyperlora(tiny_model, monkeypatch):
    import hyperlora_integrations._arguments as arguments

    loaded = []

    def fake(name, d2l="default", t2l="default"):
        loaded.append(name)
        return tiny_model

    monkeypatch.setattr(arguments, "shared_model", fake)
    llm = HyperLoRALLM("SmolLM2-135M-Instruct", max_new_tokens=2)
    assert llm.hyperlora_model is tiny_model and loaded == ["SmolLM2-135M-Instruct"]


def test_llm_forwards_generation_arguments(tiny_model, monkeypatch):
    seen = []
    original = type(tiny_model).stream_chunks

    def spy(self, prompt, adapters=(), **kwargs):
        seen.append(kwargs)
        return original(self, prompt, adapters, **kwargs)

    monkeypatch.setattr(type(tiny_model), "stream_chunks", spy)
    HyperLoRALLM(tiny_model, max_new_tokens=2, generate_kwargs={"top_k": 3}).complete("hi", repetition_penalty=1.2)
    assert seen[-1]["top_k"] == 3 and seen[-1]["repetition_penalty"] == 1.2
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        HyperLoRALLM(tiny_model).complete("hi", temprature=0.1)


def test_skill_tool_has_the_langchain_options(tiny_model, llm):
    library = SkillLibrary(tiny_model, AdapterStore())
    library.add("french", "Translate English text into French.")
    tool = skill_tool(llm, "fr", "French translation.", skill="french", library=library)
    assert tool.adapter is library.get("french").adapter
    assert list(tool.metadata.get_parameters_dict()["properties"]) == ["input"]
    plain = skill_tool(llm, "summarize", "Summarize the text in one sentence.", skill="Summarize briefly, please.")
    assert plain.adapter.metadata.description == "Summarize briefly, please."
    with pytest.raises(AdapterNotFoundError, match="did you mean 'french'"):
        skill_tool(llm, "x", "Translate.", skill="frenchh", library=library)
    with pytest.raises(TypeError, match="did you mean 'max_new_tokens'"):
        skill_tool(llm, "y", "Translate English text into French.", max_new_tokes=3)


def test_engine_arguments_llamaindex_would_drop_raise(index, llm):
    bound = llm.with_store(index.store, [index.namespace])
    with pytest.raises(TypeError, match="did you mean 'similarity_top_k'"):
        index.as_query_engine(llm=bound, simlarity_top_k=2)
    with pytest.raises(TypeError, match="'bogus'"):
        index.as_chat_engine(chat_mode="context", llm=bound, bogus=1)
    assert index.as_query_engine(llm=bound, response_mode="compact", similarity_top_k=1) is not None
    with pytest.raises(TypeError, match="'foo'"):
        index.insert(Document(text="One more."), foo=1)
