"""Long-term conversation memory: recent turns stay text, older turns are learned into an adapter.

``config`` holds ``MemoryConfig`` (budgets, consolidation recipe), ``turns`` the durable turn log,
``jobs`` what each consolidation job learns (new turns plus a replay), ``conversation`` one
conversation's ``ConversationMemory``, ``manager`` the ``MemoryManager`` over a store. Framework-free:
``hyperlora_integrations.langchain.memory`` and ``.llama_index.memory`` wrap it.
"""

from .config import MemoryConfig
from .conversation import ConversationMemory, MemoryStatus, memory_namespace
from .manager import MemoryManager
from .turns import Turn, TurnLog

__all__ = [
    "ConversationMemory",
    "MemoryConfig",
    "MemoryManager",
    "MemoryStatus",
    "Turn",
    "TurnLog",
    "memory_namespace",
]
