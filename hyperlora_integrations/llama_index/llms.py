"""``HyperLoRALLM``: a LlamaIndex LLM over a ``HyperLoRAModel`` that activates referenced adapters.

Retrievers in this package put signed references where document text would go. Every call
here hands the prompt to the core ``ReferenceResolver``, which strips all reference-shaped
strings (valid or forged), verifies the signatures and loads the adapters of the valid ones;
generation then runs with exactly those adapters active, for this call only. So an unchanged
``RetrieverQueryEngine`` answers from internalized documents without their text in the prompt.

The model is a chat model (its chat template is applied by the core), so ``metadata`` reports
``is_chat_model=True`` and LlamaIndex sends it messages; ``complete`` sends its prompt as one
user turn. What each call did is returned in ``raw`` and ``additional_kwargs``: the adapters
that were active, how each reference was served, how many references were rejected, and exact
token counts under the base model's tokenizer (``raw["usage"]``, read by ``TokenCountingHandler``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._optional import require

require("llama_index.core", "llamaindex")

from llama_index.core.base.llms.types import (  # noqa: E402
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback  # noqa: E402
from llama_index.core.llms.custom import CustomLLM  # noqa: E402
from llama_index.core.llms.function_calling import FunctionCallingLLM  # noqa: E402
from llama_index.core.llms.llm import ToolSelection  # noqa: E402

from .._arguments import check_generation_kwargs, is_generation_name, model_from, unexpected  # noqa: E402
from ..adapters import AdapterStore, ReferenceResolver, Resolution  # noqa: E402
from ..adapters.routing import route  # noqa: E402
from ..chat import last_user_text  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..generation import Chunk, SamplingParams  # noqa: E402
from ..lora import Adapter  # noqa: E402
from ..model import HyperLoRAModel  # noqa: E402
from ..toolcalls import StreamFilter, ToolSpec, grammar_options, parse_tool_calls, render_tools  # noqa: E402
from ._async import iterate_in_thread  # noqa: E402
from ._functions import (  # noqa: E402
    prepare_chat_with_tools,
    response_message,
    tool_calls_of,
    tool_message_content,
    tool_spec,
)

_ROLE_MAP = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}
_SAMPLING_KWARGS = {"max_new_tokens", "max_tokens", "temperature", "top_p", "stop", "seed"}


def to_core_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as the core's ``{"role", "content"}`` dicts.

    The model reads text only: an image, audio or document block is refused rather than
    silently dropped, since an answer that never saw the user's attachment would be wrong.
    Reasoning traces and cache markers carry no content for this model and are skipped.
    """
    out = []
    for message in messages:
        role = _ROLE_MAP.get(MessageRole(message.role))
        if role is None:
            raise InvalidInputError(f"unsupported message role {message.role!r}")
        texts = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif not isinstance(block, (ThinkingBlock, CachePoint, ToolCallBlock)):
                raise InvalidInputError(f"HyperLoRALLM is text-only; got a {type(block).__name__} in a {role} message")
        content = "\n".join(texts)
        out.append(
            {"role": role, "content": tool_message_content(message, content) if role == "assistant" else content}
        )
    if not out:
        raise InvalidInputError("empty message list")
    return out


@dataclass
class _Call:
    """One prepared call: the prompt after reference resolution and what runs with it."""

    resolution: Resolution
    adapters: list[Adapter]
    sampling: dict[str, Any]
    tool_names: list[str] = field(default_factory=list)
    parallel_tool_calls: bool = True

    def info(self) -> dict[str, Any]:
        return {
            "adapters": [a.id for a in self.adapters],
            "served_by": dict(self.resolution.served_by),
            "rejected_references": self.resolution.rejected,
        }


class HyperLoRALLM(FunctionCallingLLM, CustomLLM):
    """LlamaIndex LLM backed by a local ``HyperLoRAModel``; works as ``Settings.llm``.

    ``store`` is the adapter store whose references this LLM may activate (the store of the
    ``InternalizedIndex``/``HyperLoRARetriever`` that produced them); ``namespaces`` narrows
    it to some namespaces of that store. References signed by another store, expired ones or
    ones from other namespaces are stripped and counted as rejected, never activated.
    Extra adapters (a skill, say) can be passed per call: ``llm.complete(p, adapters=[a])``.

    It is a function-calling LLM: ``chat_with_tools``/``predict_and_call``, ``FunctionAgent``,
    ``structured_predict`` and ``as_structured_llm`` work, with tool calls decoded under a grammar
    built from the tools (``_functions.py``), so a forced call is always a valid one.
    """

    model_name: str = Field(default="", description="Name of the base model (reported in metadata).")
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens generated at most per call (num_output).")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for sampling; None draws fresh randomness.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences (not included in the output).")
    context_window: int | None = Field(
        default=None, gt=0, description="Prompt + output token budget; defaults to the model's maximum."
    )
    namespaces: list[str] | None = Field(
        default=None, description="Store namespaces whose references may be activated; None allows all."
    )
    reference_ttl: float | None = Field(
        default=3600.0, description="References older than this many seconds are rejected; None never expires."
    )
    serve_pending: Literal["context", "instant"] = Field(
        default="context",
        description="A referenced document whose consolidation is pending is served by its text in the prompt "
        "('context') or by its instant hypernetwork adapter ('instant').",
    )
    select_adapters: bool = Field(
        default=True,
        description="activate only the retrieved documents' adapters that make the question more likely "
        "(adapters/routing.py); False activates every verified reference's adapter",
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further generation arguments for every call (as HuggingFaceLLM's generate_kwargs); "
        "names the core decoder does not accept raise at construction.",
    )

    _model: HyperLoRAModel = PrivateAttr()
    _store: AdapterStore | None = PrivateAttr(default=None)
    _resolver: ReferenceResolver | None = PrivateAttr(default=None)
    _resolver_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self, model: HyperLoRAModel | str | None = None, *, store: AdapterStore | None = None, **kwargs: Any
    ) -> None:
        # A model name or path loads that model (shared per process), as ChatHyperLoRA does;
        # None is the default model.
        model = model_from(model, "HyperLoRALLM")
        if "max_tokens" in kwargs:  # the OpenAI-style name of max_new_tokens
            if "max_new_tokens" in kwargs:
                raise TypeError("HyperLoRALLM: pass max_new_tokens or max_tokens, not both")
            kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
        fields = set(type(self).model_fields)
        unknown = [key for key in kwargs if key not in fields]
        if unknown:  # CustomLLM would drop them silently
            raise unexpected("HyperLoRALLM", unknown, [*fields, "max_tokens", "store"])
        if kwargs.get("generate_kwargs"):
            check_generation_kwargs("HyperLoRALLM generate_kwargs", dict(kwargs["generate_kwargs"]), fields)
        kwargs.setdefault("model_name", model.name)
        super().__init__(**kwargs)
        if self.context_window is not None and self.context_window > model.max_context:
            raise InvalidInputError(
                f"context_window={self.context_window} exceeds the model's {model.max_context}-token context"
            )
        self._model = model
        self._store = store
        if self.max_new_tokens >= self.effective_context_window:
            raise InvalidInputError("max_new_tokens must leave room for the prompt within the context window")

    @classmethod
    def class_name(cls) -> str:
        return "HyperLoRALLM"

    # ------------------------------------------------------------------ properties
    @property
    def hyperlora_model(self) -> HyperLoRAModel:
        """The core model (tokenizer, hypernetworks, ``internalize``, ``generate_skill``)."""
        return self._model

    @property
    def store(self) -> AdapterStore | None:
        """The store whose references this LLM resolves (None: every reference is rejected)."""
        return self._store

    @property
    def effective_context_window(self) -> int:
        return self.context_window or self._model.max_context

    @property
    def metadata(self) -> LLMMetadata:
        """What LlamaIndex's prompt packing relies on, taken from the model rather than guessed."""
        return LLMMetadata(
            context_window=self.effective_context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name,
        )

    def _effective_store(self) -> AdapterStore | None:
        """The configured store, else the model's shared private store once an index made one."""
        if self._store is not None:
            return self._store
        return self._model.default_store if self._model.has_default_store else None

    def accepts_references_from(self, store: AdapterStore, namespace: str) -> bool:
        """Whether references issued for ``namespace`` of ``store`` would be activated here."""
        mine = self._effective_store()
        if mine is None or mine.path.resolve() != store.path.resolve():
            return False
        return self.namespaces is None or namespace in self.namespaces

    def with_store(self, store: AdapterStore, namespaces: Sequence[str] | None = None) -> HyperLoRALLM:
        """A copy with the same settings that resolves references against ``store``."""
        copy = self.model_copy(update={"namespaces": list(namespaces) if namespaces is not None else None})
        copy._store = store
        copy._resolver = None
        copy._resolver_lock = threading.Lock()
        return copy

    # ------------------------------------------------------------------ preparation
    def _get_resolver(self) -> ReferenceResolver:
        # Without a store nothing can verify, but references must still be stripped from the
        # prompt: an empty private store gives a resolver that rejects every one of them.
        with self._resolver_lock:
            effective = self._effective_store()
            if self._resolver is None or (self._store is None and effective is not self._resolver.store):
                store = effective if effective is not None else AdapterStore()
                self._resolver = ReferenceResolver(
                    store, namespaces=self.namespaces, ttl=self.reference_ttl, serve_pending=self.serve_pending
                )
            return self._resolver

    def _prepare(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> _Call:
        extra = kwargs.pop("adapters", None) or ()
        kwargs.pop("formatted", None)  # meaningful to completion-style LLMs only
        tools = kwargs.pop("tools", None) or []
        choice = kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", True) is not False
        if choice == "none":
            tools = []
        tools = [t if isinstance(t, ToolSpec) else tool_spec(t) for t in tools]
        if tools:  # the schemas go into the system prompt; grammar_options constrains decoding
            messages = _with_system(messages, render_tools(tools, choice))
        generation = {key: kwargs.pop(key) for key in list(kwargs) if key not in _SAMPLING_KWARGS}
        unknown = [key for key in generation if not is_generation_name(key)]
        if unknown:
            raise unexpected("HyperLoRALLM", unknown, [*_SAMPLING_KWARGS, "adapters"])
        generation = {**self.generate_kwargs, **generation}
        if isinstance(extra, Adapter):
            extra = [extra]
        extra = list(extra)
        for adapter in extra:
            if not isinstance(adapter, Adapter):
                raise InvalidInputError(f"adapters must be Adapter objects, got {type(adapter).__name__}")
        resolution = self._get_resolver().resolve(messages)
        if self.select_adapters:
            resolution = route(self._model, resolution, last_user_text(resolution.messages))
        adapters = extra + [a for a in resolution.adapters if all(a.id != e.id for e in extra)]
        if "max_tokens" in kwargs and "max_new_tokens" in kwargs:
            raise TypeError("pass max_new_tokens or max_tokens, not both")
        sampling = {
            **generation,
            "max_new_tokens": kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "stop": tuple(kwargs.get("stop", self.stop) or ()),
            "seed": kwargs.get("seed", self.seed),
        }
        SamplingParams(**sampling)  # fail at call time, not at the first token of a stream
        sampling.update(grammar_options(tools, choice, parallel, None))
        call = _Call(resolution, adapters, sampling, [t.name for t in tools], parallel)
        self._check_budget(call)
        return call

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[dict[str, str]]:
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a str, got {type(prompt).__name__}")
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        return [{"role": "user", "content": prompt}]

    def _chunks(self, call: _Call) -> Iterator[Chunk]:
        return self._model.stream_chunks(
            call.resolution.messages, call.adapters, system=self.system_prompt, **call.sampling
        )

    def _check_budget(self, call: _Call) -> None:
        """Enforce a configured ``context_window`` smaller than the model's (the core checks its own).

        LlamaIndex packs prompts to ``metadata.context_window``; a window set lower (to bound
        latency or memory) is a promise this LLM keeps instead of silently running past it.
        """
        if self.context_window is None or self.context_window >= self._model.max_context:
            return
        prompt_tokens = len(self._model.encode(call.resolution.messages, system=self.system_prompt))
        if prompt_tokens + call.sampling["max_new_tokens"] > self.context_window:
            raise InvalidInputError(
                f"prompt of {prompt_tokens} tokens + {call.sampling['max_new_tokens']} new tokens exceeds "
                f"context_window={self.context_window}"
            )

    def _raw(self, call: _Call, last: Chunk) -> dict[str, Any]:
        usage = {
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
        }
        return {"model": self.model_name, "usage": usage, "finish_reason": last.finish_reason, **call.info()}

    def _run(self, call: _Call) -> tuple[str, dict[str, Any]]:
        pieces, last = [], Chunk("")
        for chunk in self._chunks(call):
            pieces.append(chunk.text)
            last = chunk
        return "".join(pieces), self._raw(call, last)

    def _iter_completion(self, call: _Call) -> Iterator[CompletionResponse]:
        text = ""
        for chunk in self._chunks(call):
            text += chunk.text
            if chunk.finish_reason is not None:
                raw = self._raw(call, chunk)
                yield CompletionResponse(text=text, delta=chunk.text, raw=raw, additional_kwargs=_summary(raw))
            elif chunk.text:
                yield CompletionResponse(text=text, delta=chunk.text, additional_kwargs=call.info())

    def _chat_response(self, call: _Call, text: str, raw: dict[str, Any]) -> ChatResponse:
        parsed = parse_tool_calls(text, call.tool_names) if call.tool_names else None
        message = response_message(text, parsed, call.parallel_tool_calls)
        return ChatResponse(message=message, raw=raw, additional_kwargs=_summary(raw))

    def _iter_chat(self, call: _Call) -> Iterator[ChatResponse]:
        """Stream text as it comes; with tools bound, a call is held back and arrives parsed at the end."""
        filt = StreamFilter(call.tool_names)
        shown = ""
        for response in self._iter_completion(call):
            delta = filt.feed(response.delta or "")
            if response.raw:
                rest, _ = filt.finish()
                final = self._chat_response(call, response.text, response.raw)
                final.delta = delta + rest
                yield final
            elif delta:
                shown += delta
                yield ChatResponse(
                    message=ChatMessage(role=MessageRole.ASSISTANT, content=shown),
                    delta=delta,
                    additional_kwargs=response.additional_kwargs,
                )

    # ------------------------------------------------------------------ function calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments for ``chat_with_tools``: ``tool_required`` forces a call."""
        return prepare_chat_with_tools(
            tools, user_msg, chat_history, allow_parallel_tool_calls, tool_required, **kwargs
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return tool_calls_of(response, error_on_no_tool_call)

    # ------------------------------------------------------------------ sync API
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._prepare(self._prompt_messages(prompt, formatted), kwargs)
        text, raw = self._run(call)
        return CompletionResponse(text=text, raw=raw, additional_kwargs=_summary(raw))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call = self._prepare(self._prompt_messages(prompt, formatted), kwargs)
        return self._iter_completion(call)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._prepare(to_core_messages(messages), kwargs)
        text, raw = self._run(call)
        return self._chat_response(call, text, raw)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._prepare(to_core_messages(messages), kwargs)
        return self._iter_chat(call)

    # ------------------------------------------------------------------ async API (worker threads)
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._prepare(self._prompt_messages(prompt, formatted), kwargs)
        text, raw = await asyncio.to_thread(self._run, call)
        return CompletionResponse(text=text, raw=raw, additional_kwargs=_summary(raw))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        call = self._prepare(self._prompt_messages(prompt, formatted), kwargs)
        return iterate_in_thread(lambda: self._iter_completion(call))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._prepare(to_core_messages(messages), kwargs)
        text, raw = await asyncio.to_thread(self._run, call)
        return self._chat_response(call, text, raw)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = self._prepare(to_core_messages(messages), kwargs)
        return iterate_in_thread(lambda: self._iter_chat(call))


def _with_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """Append ``text`` to the leading system message, or start the conversation with one."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The flat view put in ``additional_kwargs``: adapter bookkeeping plus token counts."""
    return {
        "adapters": raw["adapters"],
        "served_by": raw["served_by"],
        "rejected_references": raw["rejected_references"],
        **raw["usage"],
    }
