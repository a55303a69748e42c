"""hyperlora_integrations: hypernetwork-generated LoRA adapters for LangChain and LlamaIndex.

Flow: base model -> encoders -> hypernetworks -> adapters (store, apply, merge, export)
-> integrations (``.langchain``, ``.llama_index``) -> bench. The core imports no framework.
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Imported on first use (PEP 562): the CLI's ``hyperlora --help`` and ``--version`` run without
# importing torch and transformers, which alone take seconds.
_LAZY = {
    "DEFAULT_MODEL_NAME": ".base_model",
    "load_base_model": ".base_model",
    "AdapterNotFoundError": ".errors",
    "BaseModelMismatchError": ".errors",
    "CheckpointError": ".errors",
    "DocumentTooLargeError": ".errors",
    "EmptyDocumentError": ".errors",
    "HyperLoRAError": ".errors",
    "HypernetworkMissingError": ".errors",
    "InvalidInputError": ".errors",
    "UnsafeFileError": ".errors",
    "Adapter": ".lora",
    "AdapterMetadata": ".lora",
    "LoraSpec": ".lora",
    "concat": ".lora",
    "HyperLoRAModel": ".model",
}

if TYPE_CHECKING:
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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
