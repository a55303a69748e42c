"""Functional LoRA: the adapter format, per-call application, merging and PEFT interop."""

from .adapter import Adapter, AdapterMetadata, concat, content_hash
from .compress import compress, retained_energy
from .config import LoraSpec
from .distance import delta_inner_matrix, delta_sq_distance
from .layer import LoRAInjector, active_weights
from .merge import merge, unmerge
from .peft_io import load_peft, save_peft

__all__ = [
    "Adapter",
    "AdapterMetadata",
    "LoRAInjector",
    "LoraSpec",
    "active_weights",
    "compress",
    "concat",
    "content_hash",
    "delta_inner_matrix",
    "delta_sq_distance",
    "load_peft",
    "merge",
    "retained_energy",
    "save_peft",
    "unmerge",
]
