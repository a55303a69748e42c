"""``HyperLoRARetriever``: LlamaIndex retrieval over internalized documents, returning references.

The nodes it returns hold a signed reference as their text, so whatever LlamaIndex builds from
them (the default response synthesizers' "context" section, a custom prompt) carries a few
dozen characters per document instead of the document. ``HyperLoRALLM`` turns those
references back into adapters. Ranking, internalization and signing live in the core
``InternalizedCorpus``; this class only maps its hits to ``NodeWithScore``.
"""

from __future__ import annotations

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

from ..adapters import Hit, InternalizedCorpus  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402

# Metadata keys we add to every node. They are bookkeeping (and the excerpt *is* document text),
# so they are kept out of what the LLM and embedders see.
ADAPTER_ID_KEY = "adapter_id"
NAMESPACE_KEY = "namespace"
EXCERPT_KEY = "excerpt"
REF_DOC_ID_KEY = "ref_doc_id"
HIDDEN_KEYS = [ADAPTER_ID_KEY, NAMESPACE_KEY, EXCERPT_KEY, REF_DOC_ID_KEY]


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

    Scores are BM25 (unnormalised, higher is better). Like a vector retriever it always returns
    up to ``similarity_top_k`` nodes; add a ``SimilarityPostprocessor(similarity_cutoff=...)``
    to drop weak matches, whose adapters would otherwise be activated too.
    """

    def __init__(
        self,
        corpus: InternalizedCorpus,
        *,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(corpus, InternalizedCorpus):
            raise InvalidInputError(f"corpus must be an InternalizedCorpus, got {type(corpus).__name__}")
        if not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise InvalidInputError(f"similarity_top_k must be a positive int, got {similarity_top_k!r}")
        self.corpus = corpus
        self.similarity_top_k = similarity_top_k
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [hit_to_node(hit) for hit in self.corpus.search(query_bundle.query_str, self.similarity_top_k)]
