"""LangChain's own standard test suites, run against ChatHyperLoRA and HyperLoRARetriever.

Fast classes use the tiny random model, slow classes the real default model. Tool calls,
structured output and JSON mode are decoded under a grammar (``constrained.py``), so even the
random model's outputs have the right *shape*; the tests still xfailed are the ones whose
assertions need the right *content* (an argument copied from the prompt, the decision to call a
tool when not forced), each with the precise reason.

Capability flags (honest):
- tool calling: yes, prompt-rendered schemas + a tool-call grammar built from the bound tools;
- tool_choice: yes, "any" or a tool name forces a call by constrained decoding;
- structured output and JSON mode: yes, decoded under the schema's grammar;
- images, audio, PDF, Anthropic-style inputs: no, the model reads text only;
- per-call model override: no, one instance serves one base model;
- serialization: no, the model holds torch weights.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from langchain_core.documents import Document
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.langchain import ChatHyperLoRA, HyperLoRARetriever

torch.set_num_threads(1)

# Why a test stays xfailed, per model. Shape is guaranteed by the grammar; these need content.
_ARG_3 = "the grammar makes the call well-formed, but the argument 3 must come from the model: {who}"
RANDOM_MODEL_XFAILS = {
    "test_tool_calling": _ARG_3.format(who="random weights pick any integer"),
    "test_tool_calling_async": _ARG_3.format(who="random weights pick any integer"),
    "test_agent_loop": "tool_choice is auto, so calling is the model's decision; a random model answers in text",
    "test_bind_runnables_as_tools": "answer_style must be a non-empty string; greedy random weights close the "
    "string at once",
    "test_unicode_tool_call_integration": "the customer name must copy the prompt's Chinese characters; "
    "a random model writes random text",
}
REAL_MODEL_XFAILS = {
    "test_agent_loop": "tool_choice is auto, so calling is the model's decision: SmolLM2-135M answers 'The weather "
    "in San Francisco, CA, is mostly sunny with a high of 88°F ...' in text instead of calling get_weather",
}


@functools.cache
def tiny_model():
    return make_tiny_model()


@functools.cache
def real_model():
    from hyperlora_integrations import HyperLoRAModel

    return HyperLoRAModel.from_pretrained()


class _Capabilities:
    """Flags shared by every chat suite below (see the module docstring for why)."""

    @property
    def chat_model_class(self) -> type[ChatHyperLoRA]:
        return ChatHyperLoRA

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}


def _format_xfails(reasons: dict[str, str]) -> type:
    """A mixin overriding exactly the standard tests named in ``reasons``, each xfailed with its reason.

    langchain-tests forbids overriding a standard test without an xfail, so the others are left
    alone. The functions are made afresh per call: marks stick to function objects, and the tiny
    and real classes give different reasons.
    """
    base = ChatModelIntegrationTests
    versions = pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    schema_types = pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])

    @versions
    def test_tool_calling(self, model: Any) -> None:
        base.test_tool_calling(self, model)

    async def test_tool_calling_async(self, model: Any) -> None:
        await base.test_tool_calling_async(self, model)

    def test_tool_calling_with_no_arguments(self, model: Any) -> None:
        base.test_tool_calling_with_no_arguments(self, model)

    def test_bind_runnables_as_tools(self, model: Any) -> None:
        base.test_bind_runnables_as_tools(self, model)

    @versions
    def test_agent_loop(self, model: Any) -> None:
        base.test_agent_loop(self, model)

    def test_unicode_tool_call_integration(self, model: Any) -> None:
        base.test_unicode_tool_call_integration(self, model)

    @schema_types
    def test_structured_output(self, model: Any, schema_type: str) -> None:
        base.test_structured_output(self, model, schema_type)

    @schema_types
    async def test_structured_output_async(self, model: Any, schema_type: str) -> None:
        await base.test_structured_output_async(self, model, schema_type)

    def test_structured_output_pydantic_2_v1(self, model: Any) -> None:
        base.test_structured_output_pydantic_2_v1(self, model)

    def test_structured_output_optional_param(self, model: Any) -> None:
        base.test_structured_output_optional_param(self, model)

    def test_json_mode(self, model: Any) -> None:
        base.test_json_mode(self, model)

    candidates = {f.__name__: f for f in list(locals().values()) if inspect.isfunction(f)}
    unknown = set(reasons) - set(candidates)
    assert not unknown, f"no override written for {unknown}"
    methods = {name: pytest.mark.xfail(reason=reason)(candidates[name]) for name, reason in reasons.items()}
    return type("FormatXfails", (), methods)


# ---------------------------------------------------------------------- tiny model (fast)
class TestChatHyperLoRAUnit(_Capabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": tiny_model()}


class TestChatHyperLoRAIntegration(_Capabilities, _format_xfails(RANDOM_MODEL_XFAILS), ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Short answers keep the suite fast; 64 tokens hold the longest forced tool call here.
        return {"model": tiny_model(), "max_tokens": 64}


DOCS = [
    Document(page_content="The Zorbian river Quill floods every spring.", metadata={"source": "quill"}),
    Document(page_content="Zorbia exports river salt harvested near Quux.", metadata={"source": "salt"}),
    Document(page_content="The river ferry of Quux runs hourly across the Quill.", metadata={"source": "ferry"}),
    Document(page_content="Blimp makers sell red blimps at the Zorbian fair.", metadata={"source": "blimps"}),
    Document(page_content="Mountain goats graze above the valley in summer.", metadata={"source": "goats"}),
]


@functools.cache
def _tiny_store() -> AdapterStore:
    # Shared across constructions: the corpus skips documents already internalized in it.
    return AdapterStore()


def _tiny_retriever(**kwargs: Any) -> HyperLoRARetriever:
    # consolidate=False, no relative cutoff: the suite checks the vector-store contract (k documents
    # back); consolidation and the cutoff have their own tests
    return HyperLoRARetriever.from_documents(
        DOCS, model=tiny_model(), store=_tiny_store(), consolidate=False, relative_score_cutoff=None, **kwargs
    )


class TestHyperLoRARetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> Any:
        return _tiny_retriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "Which river runs past Quux?"


# ---------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
class TestChatHyperLoRAUnitReal(_Capabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": real_model()}


@pytest.mark.slow
class TestChatHyperLoRAIntegrationReal(_Capabilities, _format_xfails(REAL_MODEL_XFAILS), ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": real_model(), "max_tokens": 48}


def _real_retriever(**kwargs: Any) -> HyperLoRARetriever:
    return HyperLoRARetriever.from_documents(
        DOCS, model=real_model(), store=_real_store(), consolidate=False, relative_score_cutoff=None, **kwargs
    )


@functools.cache
def _real_store() -> AdapterStore:
    return AdapterStore()


@pytest.mark.slow
class TestHyperLoRARetrieverReal(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _needs_d2l(self) -> None:
        if real_model().d2l is None:
            pytest.skip("no Doc-to-LoRA checkpoint is shipped yet: the real model cannot internalize documents")

    @property
    def retriever_constructor(self) -> Any:
        return _real_retriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "Which river runs past Quux?"
