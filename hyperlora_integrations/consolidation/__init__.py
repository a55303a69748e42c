"""Consolidation: documents (and skills) learned into their adapters by gradient steps.

``config`` holds the recipe, ``targets`` the self-supervised examples built from a text alone,
``trainer`` the training loop, ``engine`` the document-level ``consolidate`` (chunks, byte
budget, metadata). ``HyperLoRAModel.consolidate`` and the store's background worker call it.
"""

from .config import ConsolidationConfig
from .engine import consolidate, tokenize_examples
from .targets import Example, build_examples, schedule, sentences
from .trainer import ConsolidationInterrupted, FitResult, fit

__all__ = [
    "ConsolidationConfig",
    "ConsolidationInterrupted",
    "Example",
    "FitResult",
    "build_examples",
    "consolidate",
    "fit",
    "schedule",
    "sentences",
    "tokenize_examples",
]
