"""``MemoryManager``: the conversation memories of many users over one adapter store.

It holds what they share (the model, the store and its background worker, one ``TurnLog``, the
``MemoryConfig``) and hands out one ``ConversationMemory`` (conversation.py) per (user, thread).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..adapters.store import AdapterStore
from .config import MemoryConfig
from .conversation import ConversationMemory, memory_namespace
from .turns import TurnLog

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


class MemoryManager:
    """Conversation memories of many users over one adapter store (and its background worker).

    ``store`` defaults to the model's shared private store, which chat models / LLMs built on the
    same model also read (so references to memory adapters resolve with no extra argument); pass
    an ``AdapterStore(path)`` for memory that survives restarts.
    """

    def __init__(
        self, model: HyperLoRAModel, store: AdapterStore | None = None, *, config: MemoryConfig | None = None
    ) -> None:
        self.model = model
        self.store = store if store is not None else model.default_store
        self.config = config or MemoryConfig()
        self.log = TurnLog(self.store.path)
        self._memories: dict[str, ConversationMemory] = {}
        self._lock = threading.Lock()

    def memory(self, user_id: str, thread_id: str | None = None) -> ConversationMemory:
        """The memory of one user (``thread_id=None``: shared by all their threads) or thread."""
        namespace = memory_namespace(user_id, thread_id)
        with self._lock:
            memory = self._memories.get(namespace)
            if memory is None:
                memory = self._memories[namespace] = ConversationMemory(
                    self.model, self.store, user_id=user_id, thread_id=thread_id, config=self.config, log=self.log
                )
            return memory

    def forget(self, user_id: str, thread_id: str | None = None) -> int:
        """Delete one conversation's turns, adapters and jobs (``ConversationMemory.forget``)."""
        deleted = self.memory(user_id, thread_id).forget()
        with self._lock:
            self._memories.pop(memory_namespace(user_id, thread_id), None)
        return deleted

    def conversations(self) -> list[tuple[str, str | None]]:
        """(user_id, thread_id) of every conversation with stored turns."""
        return [(user, thread or None) for _, user, thread in self.log.namespaces()]

    def close(self) -> None:
        self.log.close()
