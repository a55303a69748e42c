"""``ChatHyperLoRA``: a LangChain chat model over ``HyperLoRAModel`` with adapters chosen per call.

A call's adapters come from four places, combined by rank concatenation for that call only:

1. references in the input (put there by ``HyperLoRARetriever``): verified against the adapter
   store's signing key and the namespaces this model accepts, stripped from the prompt, and
   their adapters activated. Every reference-shaped string is stripped, valid or not;
2. an explicit ``adapters=[...]`` argument to ``invoke``/``stream``/``bind``;
3. ``with_skill(...)``: a copy of the model that always applies one skill adapter;
4. ``auto_skill=True`` with a ``SkillLibrary``: the skill whose description best matches the
   latest user message (if it clears the library's threshold).

Nothing is stored on the instance between calls: adapters are handed to the core per call and
it scopes them with a ContextVar, so concurrent calls in threads or asyncio tasks cannot see
each other's adapters. ``response_metadata`` says which adapters a call used and why.

This module holds the LangChain-facing class (fields, tools, structured output, skills); what a
call resolves before generating is in ``_call.py``, the streaming itself in ``_generation.py``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from .._optional import require

require("langchain_core", "langchain")

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun  # noqa: E402
from langchain_core.language_models import BaseChatModel, LanguageModelInput  # noqa: E402
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream  # noqa: E402
from langchain_core.messages import BaseMessage  # noqa: E402
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser  # noqa: E402
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser  # noqa: E402
from langchain_core.outputs import ChatGenerationChunk, ChatResult  # noqa: E402
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough  # noqa: E402
from langchain_core.tools import BaseTool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool  # noqa: E402
from langchain_core.utils.pydantic import is_basemodel_subclass  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator  # noqa: E402

from .._arguments import shared_model, sort_constructor_arguments  # noqa: E402
from ..adapters.corpus import ReferenceResolver  # noqa: E402
from ..adapters.references import strip_references  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..lora import Adapter  # noqa: E402
from ..model import HyperLoRAModel  # noqa: E402
from ..skills import Skill, SkillLibrary, missing_skill  # noqa: E402
from ._call import ALIASES, add_system, prepare, tool_spec  # noqa: E402
from ._generation import chunks, in_thread  # noqa: E402
from ._messages import to_core_messages  # noqa: E402
from ._toolcalls import render_tools  # noqa: E402


def _load_model(base_model: str | None, d2l: str | None, t2l: str | None) -> HyperLoRAModel:
    """Load (once per process) a model named by strings, so many chat models share its weights
    (and share them with ``HyperLoRALLM``s built from the same name)."""
    return shared_model(base_model, d2l, t2l)


class ChatHyperLoRA(BaseChatModel):
    """Chat model over a frozen base model plus hypernetwork-generated LoRA adapters.

    Construct it with a loaded ``HyperLoRAModel`` (``model=...``, shared with retrievers and
    skill libraries), or with ``model_name`` (a base model folder/hub id; ``None`` is the
    embedded default) to load one, cached per process.

    ``temperature``, ``max_tokens``, ``top_p``, ``seed``, ``stop`` and ``timeout`` work as in
    API-backed chat models and may be overridden per call. ``api_key`` and ``max_retries``
    are accepted so code written for hosted models constructs this one unchanged; a local model
    has no key and no transient failures to retry, so they have no effect.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Any = Field(default=None, exclude=True)
    """A ``HyperLoRAModel``; a string here is taken as ``model_name``."""
    model_name: str | None = None
    """Base model to load when ``model`` is not given (``None``: the embedded default)."""
    d2l: str | None = "default"
    """Doc-to-LoRA checkpoint to load with ``model_name`` (``"default"``: the shipped one)."""
    t2l: str | None = "default"
    """Text-to-LoRA checkpoint to load with ``model_name``."""

    temperature: float = 0.0
    max_tokens: int | None = 256
    """New tokens per call; ``None`` allows up to the end of the context window."""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    """Default stop sequences; a call's own ``stop`` replaces them."""
    timeout: float | None = None
    """Seconds a call may spend generating; past it the call raises ``TimeoutError``."""
    streaming: bool = False
    max_retries: int = 2
    api_key: SecretStr | None = None

    adapter_store: Any = Field(default=None, exclude=True)
    """The ``AdapterStore`` whose signed references this model honours."""
    reference_namespaces: list[str] | None = None
    """Namespaces references may name; ``None``: any namespace of ``adapter_store``."""
    references_from: list[Any] = Field(default_factory=list, exclude=True)
    """Retrievers whose references to honour: sets ``adapter_store`` and the namespaces."""
    reference_ttl: float | None = 3600.0
    """References older than this many seconds are rejected (``None``: never expire)."""
    serve_pending: Literal["context", "instant"] = "context"
    """How a referenced document whose consolidation is still pending is served: its text in the
    prompt (``"context"``, default) or its instant hypernetwork adapter (``"instant"``)."""
    select_adapters: bool = True
    """Activate only the retrieved documents' adapters that make the question more likely
    (adapters/routing.py: an unrelated document's adapter hurts); False activates every verified
    reference's adapter."""

    skills: Any = Field(default=None, exclude=True)
    """A ``SkillLibrary`` for ``auto_skill`` routing and ``with_skill(name)``."""
    auto_skill: bool = False
    skill_threshold: float | None = None
    """Routing threshold; ``None`` uses the library's own."""
    skill_adapter: Any = Field(default=None, exclude=True)
    """The skill applied to every call (set by ``with_skill``)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further generation arguments for every call, as LangChain chat models keep them: a
    constructor keyword that is not a field but is a generation argument of the core decoder
    lands here (with a warning); anything else, a misspelt field above all, raises ``TypeError``."""

    _resolver: ReferenceResolver | None = PrivateAttr(default=None)
    _auto_resolver: ReferenceResolver | None = PrivateAttr(default=None)
    _warned_unhonoured: bool = PrivateAttr(default=False)
    _skill_cache: dict[str, Adapter] = PrivateAttr(default_factory=dict)
    _skill_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # ------------------------------------------------------------------ construction
    @model_validator(mode="before")
    @classmethod
    def _model_string(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("model"), str):
            values = {**values, "model_name": values["model"], "model": None}
        if isinstance(values, dict):
            values = sort_constructor_arguments("ChatHyperLoRA", cls, values, ALIASES)
        return values

    @model_validator(mode="after")
    def _setup(self) -> ChatHyperLoRA:
        if self.model is None:
            self.model = _load_model(self.model_name, self.d2l, self.t2l)
        if not isinstance(self.model, HyperLoRAModel):
            raise InvalidInputError(f"model must be a HyperLoRAModel or a model name, got {type(self.model).__name__}")
        self.model_name = self.model.name
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.references_from:
            stores = {id(r.store): r.store for r in self.references_from}
            if self.adapter_store is not None:
                stores[id(self.adapter_store)] = self.adapter_store
            if len(stores) != 1:
                raise InvalidInputError("references_from retrievers (and adapter_store) must share one AdapterStore")
            self.adapter_store = next(iter(stores.values()))
            spaces = set(self.reference_namespaces or ()) | {r.namespace for r in self.references_from}
            self.reference_namespaces = sorted(spaces)
        if self.adapter_store is not None:
            self._resolver = ReferenceResolver(
                self.adapter_store,
                namespaces=self.reference_namespaces,
                ttl=self.reference_ttl,
                serve_pending=self.serve_pending,
            )
        if self.auto_skill and not isinstance(self.skills, SkillLibrary):
            raise InvalidInputError("auto_skill=True needs skills=SkillLibrary(...)")
        if self.skill_adapter is not None and not isinstance(self.skill_adapter, Adapter):
            raise InvalidInputError("skill_adapter must be an Adapter; use with_skill() for descriptions")
        return self

    def _default_resolver(self) -> ReferenceResolver | None:
        """Honour references of retrievers built on the same model without an explicit store.

        They share the model's private ``default_store`` (nobody else can write to it), so any of
        its namespaces is this process's own. Created on first need, after a retriever exists.
        """
        if self.references_from or not self.model.has_default_store:
            return None
        with self._skill_lock:
            if self._auto_resolver is None:
                self._auto_resolver = ReferenceResolver(
                    self.model.default_store, ttl=self.reference_ttl, serve_pending=self.serve_pending
                )
            return self._auto_resolver

    # ------------------------------------------------------------------ LangChain plumbing
    @property
    def _llm_type(self) -> str:
        return "hyperlora-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "hyperlora"
        override = kwargs.get("model")
        params["ls_model_name"] = override if isinstance(override, str) else str(self.model_name)
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_num_tokens(self, text: str) -> int:
        """Exact count under the base model's tokenizer (not an estimate)."""
        return self.model.count_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Exact prompt length of ``messages`` under the chat template (references removed)."""
        core = to_core_messages(messages)
        if tools:
            specs = [tool_spec(convert_to_openai_tool(t)) for t in tools]
            core = add_system(core, render_tools(specs, None))
        return len(self.model.encode([{**m, "content": strip_references(m["content"])[0]} for m in core]))

    # ------------------------------------------------------------------ tools and structure
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Any | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, BaseMessage]:
        """Bind tools: their schemas go into the system prompt and decoding is constrained to them.

        ``tool_choice``: ``None``/"auto" (the model answers in text or makes a call), "none"
        (tools hidden), "any"/"required"/``True`` (must call one), or a tool name /
        ``{"function": {"name": ...}}`` (must call that one). A call, once started, is decoded
        under a grammar built from the bound tools (``constrained.tool_call_grammar``): it names a
        bound tool and its arguments validate against that tool's schema; a forced choice always
        produces a call. ``parallel_tool_calls=False`` allows exactly one call.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [f["function"]["name"] for f in formatted]
        choice: str | None
        if tool_choice in (None, "auto", False):
            choice = None
        elif tool_choice == "none":
            choice = "none"
        elif tool_choice in ("any", "required", True):
            choice = names[0] if len(names) == 1 else "any"
        elif isinstance(tool_choice, dict):
            choice = (tool_choice.get("function") or tool_choice).get("name")
        else:
            choice = str(tool_choice)
        if choice not in (None, "none", "any") and choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} names no bound tool (bound: {names})")
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Return outputs parsed into ``schema`` (a Pydantic class, TypedDict or JSON schema).

        Every method constrains decoding (``constrained.py``), so the reply parses on any model:
        ``json_schema`` (default) decodes a JSON object valid under ``schema``; ``json_mode``
        decodes a JSON object (under ``schema`` too when one is given, since the parser would
        reject anything else); ``function_calling`` forces a call of a tool shaped like
        ``schema``. The schema is also described in the system prompt, which is what makes the
        *content* sensible. Pydantic validators that JSON schema cannot express (custom
        ``field_validator``s) are checked after generation: with ``include_raw=False`` a failure
        raises ``OutputParserException``; with ``include_raw=True`` the result is
        ``{"raw": AIMessage, "parsed": ... or None, "parsing_error": Exception or None}``.
        ``strict`` is accepted for compatibility: outputs always follow the schema.
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format)
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            json_schema = convert_to_json_schema(schema) if schema is not None else None
            llm = self.bind(
                response_format={"type": method, "schema": json_schema}, ls_structured_output_format=ls_format
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"unknown method {method!r}: use json_schema, function_calling or json_mode")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")

    # ------------------------------------------------------------------ skills
    def skill(self, skill: str | Adapter | Skill) -> Adapter:
        """The adapter for ``skill``: an Adapter, a Skill, a library skill name, or a description.

        Descriptions go through Text-to-LoRA once and are cached on this instance. A string
        without whitespace is a skill *name*: it must be in ``skills`` (a misspelt or missing
        name raises ``AdapterNotFoundError`` rather than becoming a skill generated from one
        word); a description is a sentence.
        """
        if isinstance(skill, Adapter):
            return skill
        if isinstance(skill, Skill):
            return skill.adapter
        if not isinstance(skill, str) or not skill.strip():
            raise InvalidInputError("a skill is an Adapter, a Skill, a skill name or a non-empty description")
        library = self.skills if isinstance(self.skills, SkillLibrary) else None
        if library is not None and skill in library.names():
            return library.get(skill).adapter
        if not any(c.isspace() for c in skill.strip()):
            raise missing_skill(skill, library)
        with self._skill_lock:
            cached = self._skill_cache.get(skill)
        if cached is None:
            cached = self.model.generate_skill(skill)
            with self._skill_lock:
                self._skill_cache[skill] = cached
        return cached

    def with_skill(self, skill: str | Adapter | Skill) -> ChatHyperLoRA:
        """A copy of this chat model that applies ``skill``'s adapter to every call.

        It is a full chat model (``bind_tools``, ``with_structured_output`` and agent
        constructors accept it) sharing this one's weights; the original is unchanged.
        """
        return self.model_copy(update={"skill_adapter": self.skill(skill)})

    # ------------------------------------------------------------------ generation
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # Token callbacks: LangChain's stream() reports each chunk we yield to the run manager.
        yield from chunks(self, prepare(self, messages, stop, kwargs))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(chunks(self, prepare(self, messages, stop, kwargs)))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Generate in a worker thread (``_generation.in_thread``); the event loop runs no forward pass."""
        async for chunk in in_thread(lambda: chunks(self, prepare(self, messages, stop, kwargs))):
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, None, **kwargs))
