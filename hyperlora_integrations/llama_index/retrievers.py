"""``HyperLoRARetriever``: LlamaIndex retrieval over internalized documents, returning references.

The nodes it returns hold a signed reference as their text, so whatever LlamaIndex builds from
them (the default response synthesizers' "context" section, a custom prompt) carries a few
dozen characters per document instead of the document. ``HyperLoRALLM`` turns those
references back into adapters. Ranking, internalization and signing live in the core
``InternalizedCorpus``; this class only maps its hits to ``NodeWithScore``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._optional import require

require("llama_index.core", "llamaindex")

from llama_index.core.base.base_retriever import BaseRetriever  # noqa: E402
from llama_index.core.callbacks import CallbackManager  # noqa: E402
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K  # noqa: E402
from llama_index.core.schema import (  # noqa: E402
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from llama_index.core.vector_stores.simple import build_metadata_filter_fn  # noqa: E402
from llama_index.core.vector_stores.types import MetadataFilters  # noqa: E402

from ..adapters import Hit, InternalizedCorpus  # noqa: E402
from ..adapters.corpus import relative_cutoff  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402

# Metadata keys we add to every node. They are bookkeeping (and the excerpt *is* document text),
# so they are kept out of what the LLM and embedders see.
ADAPTER_ID_KEY = "adapter_id"
NAMESPACE_KEY = "namespace"
EXCERPT_KEY = "excerpt"
REF_DOC_ID_KEY = "ref_doc_id"
DOC_HASH_KEY = "doc_hash"  # the source Document's hash, for refresh_ref_docs
HIDDEN_KEYS = [ADAPTER_ID_KEY, NAMESPACE_KEY, EXCERPT_KEY, REF_DOC_ID_KEY, DOC_HASH_KEY]


def hit_to_node(hit: Hit) -> NodeWithScore:
    """A node whose text is the hit's reference; the excerpt is kept for display only."""
    metadata: dict[str, Any] = {
        **hit.metadata,
        ADAPTER_ID_KEY: hit.adapter_id,
        NAMESPACE_KEY: hit.namespace,
        EXCERPT_KEY: hit.excerpt,
    }
    relationships = {}
    ref_doc_id = hit.metadata.get(REF_DOC_ID_KEY)
    if isinstance(ref_doc_id, str) and ref_doc_id:
        relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=ref_doc_id)
    node = TextNode(
        id_=hit.adapter_id,
        text=hit.reference,
        metadata=metadata,
        excluded_llm_metadata_keys=list(HIDDEN_KEYS),
        excluded_embed_metadata_keys=list(HIDDEN_KEYS),
        relationships=relationships,
    )
    return NodeWithScore(node=node, score=hit.score)


class HyperLoRARetriever(BaseRetriever):
    """Top-k internalized documents for a query (BM25), as reference-carrying nodes.

    Scores are BM25 (unnormalised, higher is better). Documents that share no term with the
    query (score <= ``min_score``, default 0) are not returned, as in the LangChain retriever:
    every returned node's adapter is activated, and an unrelated adapter changes the answer for
    nothing. ``min_score=None`` returns the top k whatever they score.

    ``filters`` (``MetadataFilters``) keep only matching documents, with the semantics of
    LlamaIndex's default ``SimpleVectorStore``; ``doc_ids`` keeps documents of those source
    ``Document`` ids, ``node_ids`` those adapter ids. The top k are taken *after* filtering.
    """

    def __init__(
        self,
        corpus: InternalizedCorpus,
        *,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        filters: MetadataFilters | None = None,
        doc_ids: Sequence[str] | None = None,
        node_ids: Sequence[str] | None = None,
        min_score: float | None = 0.0,
        relative_score_cutoff: float | None = 0.5,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(corpus, InternalizedCorpus):
            raise InvalidInputError(f"corpus must be an InternalizedCorpus, got {type(corpus).__name__}")
        if not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise InvalidInputError(f"similarity_top_k must be a positive int, got {similarity_top_k!r}")
        if filters is not None and not isinstance(filters, MetadataFilters):
            raise InvalidInputError(f"filters must be MetadataFilters, got {type(filters).__name__}")
        for name, ids in (("doc_ids", doc_ids), ("node_ids", node_ids)):
            if ids is not None and (isinstance(ids, str) or not all(isinstance(i, str) for i in ids)):
                raise InvalidInputError(f"{name} must be a list of id strings")
        self.corpus = corpus
        self.similarity_top_k = similarity_top_k
        self.filters = filters
        self.doc_ids = set(doc_ids) if doc_ids is not None else None
        self.node_ids = set(node_ids) if node_ids is not None else None
        self.min_score = min_score
        relative_cutoff([], relative_score_cutoff)  # validates the value
        self.relative_score_cutoff = relative_score_cutoff
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _keeps(self, hit: Hit) -> bool:
        if self.min_score is not None and hit.score <= self.min_score:
            return False
        if self.node_ids is not None and hit.adapter_id not in self.node_ids:
            return False
        if self.doc_ids is not None and hit.metadata.get(REF_DOC_ID_KEY) not in self.doc_ids:
            return False
        if self.filters is not None:
            return build_metadata_filter_fn(lambda _: hit.metadata, self.filters)(hit.adapter_id)
        return True

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        k = self.similarity_top_k
        narrowed = self.filters is not None or self.doc_ids is not None or self.node_ids is not None
        # Filter before taking the top k: filtering the top k would drop matching documents.
        hits = self.corpus.search(query_bundle.query_str, max(k, len(self.corpus)) if narrowed else k)
        kept = relative_cutoff([hit for hit in hits if self._keeps(hit)][:k], self.relative_score_cutoff)
        return [hit_to_node(hit) for hit in kept]
