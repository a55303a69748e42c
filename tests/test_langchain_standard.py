"""LangChain's own standard test suites, run against ChatHyperLoRA and HyperLoRARetriever.

Fast classes use the tiny random model: every code path is real but its output is gibberish,
so the tests that need the *model* to follow a format (emit a tool call, emit JSON) are marked
xfail with that reason; the wiring they exercise (schema rendering, call parsing, structured
parsing) is tested on scripted outputs in ``test_langchain_chat.py``. Slow classes run the same
suites on the real default model.

Capability flags (honest):
- tool calling: yes, prompt-rendered schemas + output parsing;
- tool_choice: reported as *not* supported: it is accepted but only as an instruction, not
  enforced by constrained decoding, so forced calls are not guaranteed;
- structured output and JSON mode: yes, prompt-based, parsed and validated after generation;
- images, audio, PDF, Anthropic-style inputs: no, the model reads text only;
- per-call model override: no, one instance serves one base model;
- serialization: no, the model holds torch weights.
"""

from __future__ import annotations

import functools
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

RANDOM_MODEL = "the tiny model has random weights, so it cannot follow the tool-call or JSON format"
SMALL_MODEL = "SmolLM2-135M does not reliably follow the prompted tool-call/JSON format"


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
        return False

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}


def _format_xfails(reason: str) -> type:
    """Standard tests that pass only if the model emits a tool call or JSON when asked to."""

    class FormatTests:
        @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
        @pytest.mark.xfail(reason=reason)
        def test_tool_calling(self, model: Any) -> None:
            super().test_tool_calling(model)

        @pytest.mark.xfail(reason=reason)
        async def test_tool_calling_async(self, model: Any) -> None:
            await super().test_tool_calling_async(model)

        @pytest.mark.xfail(reason=reason)
        def test_tool_calling_with_no_arguments(self, model: Any) -> None:
            super().test_tool_calling_with_no_arguments(model)

        @pytest.mark.xfail(reason=reason)
        def test_bind_runnables_as_tools(self, model: Any) -> None:
            super().test_bind_runnables_as_tools(model)

        @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
        @pytest.mark.xfail(reason=reason)
        def test_agent_loop(self, model: Any) -> None:
            super().test_agent_loop(model)

        @pytest.mark.xfail(reason=reason)
        def test_unicode_tool_call_integration(self, model: Any, **kwargs: Any) -> None:
            super().test_unicode_tool_call_integration(model, **kwargs)

        @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
        @pytest.mark.xfail(reason=reason)
        def test_structured_output(self, model: Any, schema_type: str) -> None:
            super().test_structured_output(model, schema_type)

        @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
        @pytest.mark.xfail(reason=reason)
        async def test_structured_output_async(self, model: Any, schema_type: str) -> None:
            await super().test_structured_output_async(model, schema_type)

        @pytest.mark.xfail(reason=reason)
        def test_structured_output_pydantic_2_v1(self, model: Any) -> None:
            super().test_structured_output_pydantic_2_v1(model)

        @pytest.mark.xfail(reason=reason)
        def test_structured_output_optional_param(self, model: Any) -> None:
            super().test_structured_output_optional_param(model)

        @pytest.mark.xfail(reason=reason)
        def test_json_mode(self, model: Any) -> None:
            super().test_json_mode(model)

    return FormatTests


# ---------------------------------------------------------------------- tiny model (fast)
class TestChatHyperLoRAUnit(_Capabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": tiny_model()}


class TestChatHyperLoRAIntegration(_Capabilities, _format_xfails(RANDOM_MODEL), ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Short answers keep the suite fast; every test only checks the shape of the output.
        return {"model": tiny_model(), "max_tokens": 12}


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
    return HyperLoRARetriever.from_documents(DOCS, model=tiny_model(), store=_tiny_store(), **kwargs)


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
class TestChatHyperLoRAIntegrationReal(_Capabilities, _format_xfails(SMALL_MODEL), ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": real_model(), "max_tokens": 48}


def _real_retriever(**kwargs: Any) -> HyperLoRARetriever:
    return HyperLoRARetriever.from_documents(DOCS, model=real_model(), store=_real_store(), **kwargs)


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
