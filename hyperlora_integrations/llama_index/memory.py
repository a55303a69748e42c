"""Long-term memory for LlamaIndex: a ``BaseMemory`` whose old turns are learned into an adapter.

``HyperLoRAMemory`` is what ``SimpleChatEngine.from_defaults(llm=llm, memory=memory)`` or an
agent (``FunctionAgent.run(..., memory=memory)``) takes, unchanged. ``put`` stores every message
durably; ``get`` returns the recent turns within the budget plus older turns whose
consolidation has not landed yet, and, once the conversation has a memory adapter, a signed
reference to it at the start of the first message. ``HyperLoRALLM`` strips the reference from
the prompt and activates the adapter for that call (the same mechanism as its retrievers), so
the chat engine needs no other change. The reference names this conversation's own store
namespace only: another user's memory cannot be activated through it.

The core (``hyperlora_integrations.memory``) does the work; this module converts messages.
"""

from __future__ import annotations

from typing import Any

from .._optional import require

require("llama_index.core", "llamaindex")

from llama_index.core.base.llms.types import ChatMessage, TextBlock  # noqa: E402
from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.memory.types import BaseMemory  # noqa: E402

from ..adapters.references import strip_references  # noqa: E402
from ..adapters.store import AdapterStore  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..memory import ConversationMemory, MemoryConfig, MemoryManager  # noqa: E402
from ..memory.turns import Turn  # noqa: E402
from ..model import HyperLoRAModel  # noqa: E402
from .llms import HyperLoRALLM, to_core_messages  # noqa: E402


def _stored(message: ChatMessage) -> dict[str, Any]:
    """The core text of a message and the message itself, references removed from its text."""
    core = to_core_messages([message])[0]
    dump = message.model_dump(mode="json")
    for block in dump.get("blocks", []):
        if block.get("block_type") == "text":
            block["text"] = strip_references(block.get("text", ""))[0]
    return {"role": core["role"], "content": core["content"], "extra": {"llama_index": dump}}


def to_llama_index(turn: Turn) -> ChatMessage:
    """A stored turn as the LlamaIndex message it was (or a plain one, if stored by other code)."""
    data = turn.extra.get("llama_index")
    if isinstance(data, dict):
        try:
            return ChatMessage.model_validate(data)
        except ValueError:
            pass
    return ChatMessage(role=turn.role, content=turn.content)


class HyperLoRAMemory(BaseMemory):
    """One conversation's long-term memory (see the module doc).

    Build it with ``from_defaults(llm=HyperLoRALLM(...), user_id=..., store=...)``. The LLM must
    resolve references against the memory's store (``HyperLoRALLM(model, store=store)``, or no
    store on either: both then use the model's private store); ``from_defaults`` checks it.
    """

    user_id: str = Field(description="whose memory this is")
    thread_id: str | None = Field(default=None, description="None: one memory across the user's threads")
    reference_ttl: float | None = Field(default=3600.0, description="lifetime of the adapter reference in get()")

    _memory: ConversationMemory = PrivateAttr()

    @classmethod
    def class_name(cls) -> str:
        return "HyperLoRAMemory"

    @classmethod
    def from_defaults(
        cls,
        llm: HyperLoRALLM | None = None,
        *,
        user_id: str = "default",
        thread_id: str | None = None,
        store: AdapterStore | None = None,
        config: MemoryConfig | None = None,
        model: HyperLoRAModel | None = None,
        manager: MemoryManager | None = None,
        **kwargs: Any,
    ) -> HyperLoRAMemory:
        """A memory for ``user_id`` (and ``thread_id``) in ``store`` (default: the LLM's store,
        else the model's private one). A ``manager`` shares one turn log and config between the
        memories of many users."""
        if manager is None:
            if model is None:
                if not isinstance(llm, HyperLoRALLM):
                    raise InvalidInputError("HyperLoRAMemory.from_defaults needs llm=HyperLoRALLM(...) or model=")
                model = llm.hyperlora_model
            if store is None and isinstance(llm, HyperLoRALLM):
                store = llm.store
            manager = MemoryManager(model, store, config=config)
        memory = manager.memory(user_id, thread_id)
        if isinstance(llm, HyperLoRALLM) and not llm.accepts_references_from(manager.store, memory.namespace):
            raise InvalidInputError(
                "this HyperLoRALLM would not activate the memory adapter: build it with the memory's store "
                "(HyperLoRALLM(model, store=store)) and namespaces=None or including memory.namespace"
            )
        out = cls(user_id=user_id, thread_id=thread_id, **kwargs)
        out._memory = memory
        return out

    @property
    def memory(self) -> ConversationMemory:
        """The framework-free conversation memory (status, consolidate_now, forget, ...)."""
        return self._memory

    @property
    def namespace(self) -> str:
        return self._memory.namespace

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        """What the prompt needs as text, the memory adapter's reference in front of it."""
        turns = self._memory.prompt_turns()
        messages = [to_llama_index(t) for t in turns]
        reference = self._memory.reference(ttl=self.reference_ttl)
        if reference is not None and messages:
            first = messages[0].model_copy(deep=True)
            first.blocks = [*first.blocks]
            if first.blocks and getattr(first.blocks[0], "block_type", None) == "text":
                first.blocks[0] = first.blocks[0].model_copy(update={"text": reference + first.blocks[0].text})
            else:  # a message that starts with a tool call: the reference goes in a block of its own
                first.blocks.insert(0, TextBlock(text=reference))
            messages[0] = first
        return messages

    def get_all(self) -> list[ChatMessage]:
        """The whole conversation, consolidated turns included (nothing is ever dropped)."""
        return [to_llama_index(t) for t in self._memory.turns()]

    def put(self, message: ChatMessage) -> None:
        self.put_messages([message])

    def put_messages(self, messages: list[ChatMessage]) -> None:
        """Store messages in one transaction (an agent's tool call and its result together)."""
        self._memory.add_messages([_stored(m) for m in messages])

    def set(self, messages: list[ChatMessage]) -> None:
        """Make the history ``messages``: appended when they extend what is stored (what chat
        engines and agents pass back), otherwise the conversation is forgotten and rewritten."""
        old = [(t.role, t.content) for t in self._memory.turns()]
        new = [_stored(m) for m in messages]
        if old == [(n["role"], n["content"]) for n in new[: len(old)]]:
            self._memory.add_messages(new[len(old) :])
            return
        self._memory.forget()
        self._memory.add_messages(new)

    def reset(self) -> None:
        """Forget the conversation: turns, memory adapter and queued consolidation, from disk."""
        self._memory.forget()
