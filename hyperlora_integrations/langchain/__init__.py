"""LangChain integration: ``ChatHyperLoRA``, ``HyperLoRARetriever``, ``skill_tool`` and the
long-term chat memory (``HyperLoRAMemory``).

Importing this subpackage imports ``langchain-core`` (install the ``[langchain]`` extra);
``import hyperlora_integrations`` alone never does.
"""

from .._optional import require

require("langchain_core", "langchain")

from .chat_models import ChatHyperLoRA  # noqa: E402
from .memory import HyperLoRAChatMessageHistory, HyperLoRAMemory, MemoryBoundModel, with_memory  # noqa: E402
from .retrievers import HyperLoRARetriever  # noqa: E402
from .tools import skill_tool  # noqa: E402

__all__ = [
    "ChatHyperLoRA",
    "HyperLoRAChatMessageHistory",
    "HyperLoRAMemory",
    "HyperLoRARetriever",
    "MemoryBoundModel",
    "skill_tool",
    "with_memory",
]
