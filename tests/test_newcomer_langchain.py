"""Issue #20, LangChain side: what a newcomer hit, each as a test on the tiny model.

Unknown or misspelt arguments never pass silently; ``search_kwargs``; skill names that name
nothing; one skill-tool signature with LlamaIndex; the retriever's empty result.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402

from hyperlora_integrations.adapters import AdapterStore  # noqa: E402
from hyperlora_integrations.errors import AdapterNotFoundError  # noqa: E402
from hyperlora_integrations.langchain import ChatHyperLoRA, HyperLoRARetriever, skill_tool  # noqa: E402
from hyperlora_integrations.skills import SkillLibrary  # noqa: E402

DOCS = [
    Document(page_content="The cat sat on the mat in Lisbon.", metadata={"tenant": "a", "source": "cat"}),
    Document(page_content="The dog slept on the rug in Oslo.", metadata={"tenant": "b", "source": "dog"}),
    Document(page_content="A cat and a dog shared the garden.", metadata={"tenant": "b", "source": "both"}),
]


@pytest.fixture(scope="module")
def retriever(tiny_model):
    return HyperLoRARetriever.from_documents(DOCS, model=tiny_model)


# ---------------------------------------------------------------- item 1: constructor arguments
def test_misspelt_constructor_argument_raises_with_a_suggestion(tiny_model):
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        ChatHyperLoRA(model=tiny_model, max_new_tokens=5, temprature=0.3)


def test_hf_names_are_accepted_as_aliases(tiny_model):
    llm = ChatHyperLoRA(model=tiny_model, max_new_tokens=5)
    assert llm.max_tokens == 5
    assert llm.invoke("hi").usage_metadata["output_tokens"] <= 5
    with pytest.raises(TypeError, match="not both"):
        ChatHyperLoRA(model=tiny_model, max_new_tokens=5, max_tokens=6)


def test_generation_arguments_move_to_model_kwargs_with_a_warning(tiny_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = ChatHyperLoRA(model=tiny_model, top_k=5, max_tokens=3)
    assert llm.model_kwargs == {"top_k": 5}
    assert any("model_kwargs" in str(w.message) for w in caught)


def test_model_kwargs_reach_every_call(tiny_model, monkeypatch):
    seen = []
    original = type(tiny_model).stream_chunks

    def spy(self, prompt, adapters=(), **kwargs):
        seen.append(kwargs)
        return original(self, prompt, adapters, **kwargs)

    monkeypatch.setattr(type(tiny_model), "stream_chunks", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = ChatHyperLoRA(model=tiny_model, top_k=5, max_tokens=3)
    llm.invoke("hi")
    llm.invoke("hi", repetition_penalty=1.3)  # a per-call generation argument is forwarded too
    assert seen[0]["top_k"] == 5 and seen[0]["max_new_tokens"] == 3
    assert seen[1]["top_k"] == 5 and seen[1]["repetition_penalty"] == 1.3


def test_unknown_constructor_and_call_arguments_raise(tiny_model):
    with pytest.raises(TypeError, match="'foo'"):
        ChatHyperLoRA(model=tiny_model, foo=1)
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        ChatHyperLoRA(model=tiny_model).invoke("hi", temprature=0.3)
    with pytest.raises(TypeError, match="directly"):
        ChatHyperLoRA(model=tiny_model, model_kwargs={"temperature": 0.5})


def test_retriever_search_kwargs_and_unknown_arguments(tiny_model, retriever):
    with pytest.raises(TypeError, match="top_k"):
        HyperLoRARetriever.from_documents(DOCS, model=tiny_model, search_kwargs={"k": 1}, top_k=1)
    with pytest.raises(TypeError, match="did you mean 'score_threshold'"):
        HyperLoRARetriever(model=tiny_model, search_kwargs={"score_treshold": 1.0})
    one = HyperLoRARetriever(
        model=tiny_model, store=retriever.store, namespace=retriever.namespace, search_kwargs={"k": 1}
    )
    assert one.k == 1
    assert len(one.invoke("cat dog garden")) == 1
    strict = HyperLoRARetriever(
        model=tiny_model, store=retriever.store, namespace=retriever.namespace, search_kwargs={"score_threshold": 1e9}
    )
    assert strict.min_score == 1e9 and strict.invoke("cat") == []


def test_retriever_filter_never_returns_another_tenant(tiny_model, retriever):
    docs = retriever.invoke("cat mat Lisbon", filter={"tenant": "b"})
    assert docs and {d.metadata["tenant"] for d in docs} == {"b"}
    scoped = HyperLoRARetriever(
        model=tiny_model,
        store=retriever.store,
        namespace=retriever.namespace,
        search_kwargs={"filter": {"tenant": "a"}},
    )
    assert {d.metadata["tenant"] for d in scoped.invoke("cat dog")} == {"a"}
    by_callable = retriever.invoke("cat dog", filter=lambda meta: meta.get("source") == "both")
    assert [d.metadata["source"] for d in by_callable] == ["both"]


# ---------------------------------------------------------------- item 6: empty result
def test_retriever_returns_nothing_when_no_term_matches(retriever):
    assert retriever.invoke("zebra quantum") == []


# ---------------------------------------------------------------- item 3: skill names
def test_with_skill_of_a_name_without_a_library_raises(tiny_model):
    llm = ChatHyperLoRA(model=tiny_model)
    with pytest.raises(AdapterNotFoundError, match="no skill library"):
        llm.with_skill("sql")


def test_with_skill_of_a_misspelt_name_suggests_the_right_one(tiny_model):
    library = SkillLibrary(tiny_model, AdapterStore())
    library.add("sql", "Write SQL queries for the sales database.")
    llm = ChatHyperLoRA(model=tiny_model, skills=library)
    assert llm.with_skill("sql").skill_adapter is library.get("sql").adapter
    with pytest.raises(AdapterNotFoundError, match="did you mean 'sql'"):
        llm.with_skill("sqll")
    # a sentence is a description: generated, not looked up
    assert llm.with_skill("Write SQL for the sales database.").skill_adapter.kind == "skill"


# ---------------------------------------------------------------- item 8: one tool signature
def test_skill_tool_takes_input_library_and_skill_like_llamaindex(tiny_model):
    llm = ChatHyperLoRA(model=tiny_model, max_tokens=3)
    library = SkillLibrary(tiny_model, AdapterStore())
    tool = skill_tool(llm, "french", "Translate English text into French.", library=library)
    assert list(tool.args) == ["input"]
    assert isinstance(tool.invoke({"input": "Good morning"}), str)
    assert library.names() == ["french"]  # kept in the library under the tool's name
    again = skill_tool(llm, "french", "Translate English text into French.", library=library)
    assert again.invoke("Good morning") == tool.invoke("Good morning")
    by_name = skill_tool(llm, "fr2", "French translation.", skill="french", library=library)
    assert by_name.description == "French translation."
    with pytest.raises(AdapterNotFoundError):
        skill_tool(llm, "x", "Translate English text into French.", skill="frnech", library=library)
    with pytest.raises(TypeError, match="did you mean 'max_tokens'"):
        skill_tool(llm, "y", "Translate English text into French.", max_tokes=3)
