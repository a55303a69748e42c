"""hyperlora_integrations: hypernetwork-generated LoRA adapters for LangChain and LlamaIndex.

Flow: base model -> encoders -> hypernetworks -> adapters (store, apply, merge, export)
-> integrations (``.langchain``, ``.llama_index``) -> bench. The core imports no framework.
"""

from .base_model import DEFAULT_MODEL_NAME, load_base_model
from .errors import (
    AdapterNotFoundError,
    BaseModelMismatchError,
    CheckpointError,
    DocumentTooLargeError,
    EmptyDocumentError,
    HyperLoRAError,
    HypernetworkMissingError,
    InvalidInputError,
    UnsafeFileError,
)
from .lora import Adapter, AdapterMetadata, LoraSpec, concat
from .model import HyperLoRAModel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL_NAME",
    "Adapter",
    "AdapterMetadata",
    "AdapterNotFoundError",
    "BaseModelMismatchError",
    "CheckpointError",
    "DocumentTooLargeError",
    "EmptyDocumentError",
    "HyperLoRAError",
    "HyperLoRAModel",
    "HypernetworkMissingError",
    "InvalidInputError",
    "LoraSpec",
    "UnsafeFileError",
    "concat",
    "load_base_model",
]
