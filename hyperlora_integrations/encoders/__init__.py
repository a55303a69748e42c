"""Encoders turn text into what hypernetworks read: per-layer activations or one embedding."""

from .activations import chunk_ids, document_activations
from .description import DescriptionEncoder, SentenceEncoder, description_encoder

__all__ = ["DescriptionEncoder", "SentenceEncoder", "chunk_ids", "description_encoder", "document_activations"]
