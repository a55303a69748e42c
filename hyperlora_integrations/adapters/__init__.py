"""Adapters at rest and in flight: the store, signed references, retrieval over internalized docs."""

from .corpus import Hit, InternalizedCorpus, ReferenceResolver, Resolution
from .references import Reference, ReferenceSigner
from .retrieval import BM25Index
from .store import AdapterStore, store_signer

__all__ = [
    "AdapterStore",
    "BM25Index",
    "Hit",
    "InternalizedCorpus",
    "Reference",
    "ReferenceResolver",
    "ReferenceSigner",
    "Resolution",
    "store_signer",
]
