"""Encoders turn text into what hypernetworks read: per-layer activations or one embedding."""

from .activations import chunk_ids, document_activations
from .description import DescriptionEncoder

__all__ = ["DescriptionEncoder", "chunk_ids", "document_activations"]
