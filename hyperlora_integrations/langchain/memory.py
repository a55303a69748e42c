"""Long-term memory for LangChain: a chat history whose old turns are learned into an adapter.

Two pieces, so a standard ``RunnableWithMessageHistory`` example changes in two lines:

- ``HyperLoRAMemory(llm, store=...).get_session_history`` is the history factory. Each session's
  ``HyperLoRAChatMessageHistory`` stores every message durably and returns, as ``messages``,
  only what the prompt needs as text: the recent turns within the budget, plus older turns whose
  consolidation has not landed yet;
- ``with_memory(llm)`` is the chat model in the chain. It reads the history that
  ``RunnableWithMessageHistory`` put in the call's config (``configurable["message_history"]``)
  and activates that session's memory adapter for the call, so the adapter that activates is
  always the one of the session whose history was loaded: never another user's.

The core (``hyperlora_integrations.memory``) does the work; this module only converts messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from .._optional import require

require("langchain_core", "langchain")

from langchain_core.chat_history import BaseChatMessageHistory  # noqa: E402
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict  # noqa: E402
from langchain_core.messages import ChatMessage as LCChatMessage  # noqa: E402
from langchain_core.runnables import Runnable, RunnableConfig  # noqa: E402
from langchain_core.runnables.config import ensure_config  # noqa: E402

from ..adapters.references import strip_references  # noqa: E402
from ..adapters.store import AdapterStore  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..lora import Adapter  # noqa: E402
from ..memory import ConversationMemory, MemoryConfig, MemoryManager  # noqa: E402
from ..memory.turns import Turn  # noqa: E402
from ._messages import to_core_messages  # noqa: E402

_ROLE_TYPES = {"user": "human", "assistant": "ai", "system": "system"}


def _stored(message: BaseMessage, core: dict[str, str]) -> dict[str, Any]:
    """What the turn log keeps of a LangChain message: the core text, and the message itself
    (for its type, tool calls and ids), with any adapter reference removed from its text."""
    data = message_to_dict(message)
    if isinstance(message.content, str):
        data["data"]["content"] = strip_references(message.content)[0]
        extra = {"langchain": data}
    else:  # content blocks: the text is what the model read; the blocks are not kept
        extra = {}
    return {"role": core["role"], "content": core["content"], "extra": extra}


def to_langchain(turn: Turn) -> BaseMessage:
    """A stored turn as the LangChain message it was (or a plain one, if stored by other code)."""
    data = turn.extra.get("langchain")
    if isinstance(data, dict):
        try:
            return messages_from_dict([data])[0]
        except (KeyError, TypeError, ValueError):
            pass
    kind = _ROLE_TYPES.get(turn.role)
    if kind is None:
        return LCChatMessage(role=turn.role, content=turn.content)
    return messages_from_dict([{"type": kind, "data": {"content": turn.content}}])[0]


class HyperLoRAChatMessageHistory(BaseChatMessageHistory):
    """One session's history over a ``ConversationMemory``.

    ``messages`` is the prompt's share (recent window + turns not yet consolidated), not the
    whole conversation: ``all_messages`` has that. ``clear()`` forgets the session: its turns,
    its memory adapter and its queued consolidation are deleted from disk.
    """

    def __init__(self, memory: ConversationMemory) -> None:
        self.memory = memory

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return [to_langchain(t) for t in self.memory.prompt_turns()]

    @property
    def all_messages(self) -> list[BaseMessage]:
        return [to_langchain(t) for t in self.memory.turns()]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        messages = list(messages)
        core = to_core_messages(messages) if messages else []
        self.memory.add_messages([_stored(m, c) for m, c in zip(messages, core, strict=True)])

    def clear(self) -> None:
        self.memory.forget()

    def adapters(self) -> list[Adapter]:
        return self.memory.adapters()


class HyperLoRAMemory:
    """Per-session long-term memory for ``RunnableWithMessageHistory`` (see the module doc).

    ``llm`` is a ``ChatHyperLoRA`` (its model is used) or a ``HyperLoRAModel``. ``store`` is
    where turns and adapters persist (default: the model's private store, gone with the
    process). ``session_id`` names a user's memory; pass ``thread_id`` to ``history`` for a
    memory per thread instead.
    """

    def __init__(self, llm: Any, store: AdapterStore | None = None, *, config: MemoryConfig | None = None) -> None:
        model = getattr(llm, "model", llm)
        from ..model import HyperLoRAModel

        if not isinstance(model, HyperLoRAModel):
            raise InvalidInputError(
                f"HyperLoRAMemory needs a ChatHyperLoRA or HyperLoRAModel, got {type(llm).__name__}"
            )
        self.manager = MemoryManager(model, store, config=config)

    @property
    def store(self) -> AdapterStore:
        return self.manager.store

    def history(self, user_id: str, thread_id: str | None = None) -> HyperLoRAChatMessageHistory:
        return HyperLoRAChatMessageHistory(self.manager.memory(user_id, thread_id))

    def get_session_history(self, session_id: str) -> HyperLoRAChatMessageHistory:
        """The factory ``RunnableWithMessageHistory`` calls with the session id."""
        return self.history(session_id)

    def forget(self, user_id: str, thread_id: str | None = None) -> int:
        return self.manager.forget(user_id, thread_id)


def with_memory(llm: Runnable) -> MemoryBoundModel:
    """``llm`` with the memory adapter of each call's session active (``MemoryBoundModel``).

    It needs no memory object: the session's history, which ``RunnableWithMessageHistory`` puts
    in the call's config, says whose adapter to activate."""
    return MemoryBoundModel(llm)


def session_adapters(config: RunnableConfig | None) -> list[Adapter]:
    """The memory adapter of the history ``RunnableWithMessageHistory`` loaded for this call."""
    history = ensure_config(config).get("configurable", {}).get("message_history")
    if isinstance(history, HyperLoRAChatMessageHistory):
        return history.adapters()
    return []


class MemoryBoundModel(Runnable):
    """A chat model (``ChatHyperLoRA`` or a binding of it) that activates, per call, the memory
    adapter of the session in the call's config; without a memory history there, a plain call."""

    def __init__(self, llm: Runnable) -> None:
        self.llm = llm

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.llm.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return self.llm.OutputType

    def _kwargs(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        adapters = session_adapters(config)
        if adapters:
            kwargs = {**kwargs, "adapters": [*kwargs.get("adapters", ()), *adapters]}
        return kwargs

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self.llm.invoke(input, config, **self._kwargs(config, kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self.llm.ainvoke(input, config, **self._kwargs(config, kwargs))

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self.llm.stream(input, config, **self._kwargs(config, kwargs))

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self.llm.astream(input, config, **self._kwargs(config, kwargs)):
            yield chunk
