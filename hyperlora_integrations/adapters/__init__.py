"""Adapters at rest and in flight: the store, its background worker, signed references, retrieval."""

from .corpus import Hit, InternalizedCorpus, ReferenceResolver, Resolution, document_id
from .references import Reference, ReferenceSigner
from .retrieval import BM25Index
from .store import AdapterStore, Job, store_signer
from .worker import BackgroundWorker, drain

__all__ = [
    "AdapterStore",
    "BM25Index",
    "BackgroundWorker",
    "Hit",
    "InternalizedCorpus",
    "Job",
    "Reference",
    "ReferenceResolver",
    "ReferenceSigner",
    "Resolution",
    "document_id",
    "drain",
    "store_signer",
]
