"""LlamaIndex integration: an LLM that activates referenced adapters, an internalizing index and
retriever, skill tools for agents, and a long-term chat memory (``HyperLoRAMemory``).

Importing this subpackage imports ``llama-index-core`` (install the ``[llamaindex]`` extra);
``import hyperlora_integrations`` alone never does.
"""

from .._optional import require

require("llama_index.core", "llamaindex")

from .indices import InternalizedIndex  # noqa: E402
from .llms import HyperLoRALLM  # noqa: E402
from .memory import HyperLoRAMemory  # noqa: E402
from .retrievers import HyperLoRARetriever  # noqa: E402
from .tools import SkillTool, skill_tool  # noqa: E402

__all__ = ["HyperLoRALLM", "HyperLoRAMemory", "HyperLoRARetriever", "InternalizedIndex", "SkillTool", "skill_tool"]
