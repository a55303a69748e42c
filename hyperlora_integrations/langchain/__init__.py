"""LangChain integration: ``ChatHyperLoRA``, ``HyperLoRARetriever`` and ``skill_tool``.

Importing this subpackage imports ``langchain-core`` (install the ``[langchain]`` extra);
``import hyperlora_integrations`` alone never does.
"""

from .._optional import require

require("langchain_core", "langchain")

from .chat_models import ChatHyperLoRA  # noqa: E402
from .retrievers import HyperLoRARetriever  # noqa: E402
from .tools import skill_tool  # noqa: E402

__all__ = ["ChatHyperLoRA", "HyperLoRARetriever", "skill_tool"]
