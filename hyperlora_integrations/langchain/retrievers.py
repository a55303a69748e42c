"""``HyperLoRARetriever``: a drop-in for a vector-store retriever that hands out adapters, not text.

``add_documents`` internalizes each document (Doc-to-LoRA) into an adapter kept in an
``AdapterStore``. ``invoke(query)`` ranks the internalized documents by BM25 over their source
text and returns ``Document``s whose ``page_content`` is a short signed reference to the adapter
(``mode="hybrid"`` adds a short excerpt). A chain formats them into its prompt like any
documents; ``ChatHyperLoRA`` then strips the references and activates their adapters for that
call, so the document text never takes up the prompt.

Why BM25: it is a real relevance score that needs no embedding model (nothing to download or
run per query) and rewards exact matches of names and terms, which is what questions about
specific documents mostly hinge on. Scores are unnormalised, higher is better, and reported in
each document's metadata (``score``, ``score_type="bm25"``).

Long documents are split into passages of about ``chunk_tokens`` tokens before internalizing, so
retrieval ranks passages and a call activates only the relevant ones: this keeps the activated
rank small (Doc-to-LoRA concatenates one rank block per 512-token chunk, and very high
concatenated ranks degrade generation).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from .._optional import require

require("langchain_core", "langchain")

from langchain_core.callbacks import CallbackManagerForRetrieverRun  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr, model_validator  # noqa: E402

from .._arguments import unexpected  # noqa: E402
from ..adapters import InternalizedCorpus  # noqa: E402
from ..adapters.corpus import relative_cutoff  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..model import HyperLoRAModel  # noqa: E402

_PARAGRAPH_RE = re.compile(r"\n\s*\n")
# search_kwargs keys of LangChain's VectorStoreRetriever that mean something here -> our field.
_SEARCH_KWARGS = {"k": "k", "score_threshold": "min_score", "filter": "filter"}
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")


def _as_model(model: Any) -> HyperLoRAModel:
    """Accept a ``HyperLoRAModel`` or anything holding one (a ``ChatHyperLoRA``)."""
    inner = getattr(model, "model", None)
    if not isinstance(model, HyperLoRAModel) and isinstance(inner, HyperLoRAModel):
        model = inner
    if not isinstance(model, HyperLoRAModel):
        raise InvalidInputError(f"model must be a HyperLoRAModel or ChatHyperLoRA, got {type(model).__name__}")
    return model


def split_passages(text: str, max_tokens: int, count: Any) -> list[str]:
    """Split ``text`` at paragraph, then sentence, then word boundaries into pieces of at most
    about ``max_tokens`` tokens (``count(text) -> int``), packing small neighbours together."""
    if count(text) <= max_tokens:
        return [text]

    def pieces(block: str, level: int) -> list[tuple[str, str]]:
        seps = [(_PARAGRAPH_RE, "\n\n"), (_SENTENCE_RE, " "), (re.compile(r"\s+"), " ")]
        if level >= len(seps) or count(block) <= max_tokens:
            return [(block, seps[min(level, len(seps) - 1)][1])]
        regex, joiner = seps[level]
        out: list[tuple[str, str]] = []
        for part in regex.split(block):
            if part.strip():
                out += pieces(part, level + 1) if count(part) > max_tokens else [(part, joiner)]
        return out

    passages: list[str] = []
    current, size = "", 0
    for part, joiner in pieces(text, 0):
        n = count(part)
        if current and size + n > max_tokens:
            passages.append(current)
            current, size = "", 0
        current = f"{current}{joiner}{part}" if current else part
        size += n
    if current:
        passages.append(current)
    return passages


class HyperLoRARetriever(BaseRetriever):
    """Retriever over internalized documents: returns signed adapter references, ranked by BM25.

    Pass the same retriever to ``ChatHyperLoRA(references_from=[retriever])`` so the chat model
    honours its references (and only those of namespaces it was given).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Any = Field(exclude=True)
    """The ``HyperLoRAModel`` (or a ``ChatHyperLoRA``) whose Doc-to-LoRA internalizes documents."""
    store: Any = Field(default=None, exclude=True)
    """The ``AdapterStore`` holding the adapters (default: a private temporary one)."""
    namespace: str = "default"
    k: int = 4
    """How many documents ``invoke`` returns (at most; see ``min_score``)."""
    mode: Literal["reference", "hybrid"] = "reference"
    """``hybrid`` keeps a short excerpt of the text next to the reference in ``page_content``."""
    excerpt_chars: int = 300
    chunk_tokens: int | None = 1024
    """Documents longer than this are split into passages internalized separately (``None``: never)."""
    min_score: float | None = 0.0
    """Only documents scoring above this are returned (``None``: the top k whatever they score).
    The default drops documents that share no term with the query: activating an unrelated
    adapter changes the answer for nothing, unlike an unrelated passage in a stuffed prompt."""
    relative_score_cutoff: float | None = 0.5
    """Drop documents scoring below this fraction of the best one (``None``: keep the top k).
    Unrelated adapters hurt more than unrelated passages do; see ``adapters.corpus.relative_cutoff``."""
    reference_ttl: float | None = 3600.0
    """Lifetime of issued references; the chat model's ``reference_ttl`` decides acceptance."""
    search_kwargs: dict[str, Any] = Field(default_factory=dict)
    """The vector-store retriever convention: ``{"k": 2}``, ``{"score_threshold": 1.5}`` (sets
    ``min_score``), ``{"filter": {"tenant": "a"}}`` (metadata equality, or a callable taking a
    metadata dict); other keys raise."""
    consolidate: Literal["background", "now"] | bool = "background"
    """Learn each document into its adapter by gradient steps (``HyperLoRAModel.consolidate``):
    ``"background"`` (default) stores the instant adapter and consolidates in a background worker,
    the chat model serving the text until then; ``"now"`` blocks until consolidated (progress bar);
    ``False`` keeps the one-pass hypernetwork adapter only."""
    filter: Any = Field(default=None, exclude=True)
    """Only documents whose metadata match: a dict of required values, or ``callable(metadata)``."""

    _corpus: InternalizedCorpus = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _known_arguments(cls, values: Any) -> Any:
        """Unknown keywords raise instead of being dropped (``top_k=1`` used to keep ``k=4``)."""
        if not isinstance(values, dict):
            return values
        fields = set(cls.model_fields)
        unknown = [key for key in values if key not in fields]
        if unknown:
            hint = (
                " (the number of documents is k=, or search_kwargs={'k': ...})"
                if {
                    "top_k",
                    "similarity_top_k",
                    "n",
                }
                & set(unknown)
                else ""
            )
            raise TypeError(str(unexpected("HyperLoRARetriever", unknown, fields)) + hint)
        search = values.get("search_kwargs") or {}
        if not isinstance(search, dict):
            raise TypeError(f"search_kwargs must be a dict, got {type(search).__name__}")
        bad = set(search) - set(_SEARCH_KWARGS)
        if bad:
            raise TypeError(str(unexpected("HyperLoRARetriever search_kwargs", bad, _SEARCH_KWARGS)))
        values = dict(values)
        for key, field in _SEARCH_KWARGS.items():
            if key in search:
                if field in values and values[field] != search[key]:
                    raise TypeError(f"HyperLoRARetriever: {field}= and search_kwargs[{key!r}] disagree")
                values[field] = search[key]
        return values

    @model_validator(mode="after")
    def _setup(self) -> HyperLoRARetriever:
        self.model = _as_model(self.model)
        if self.store is None:
            # The model's shared private store, so a ChatHyperLoRA on the same model honours this
            # retriever's references with no extra argument; a namespace of its own keeps two
            # such retrievers' documents apart, as two vector stores would be.
            self.store = self.model.default_store
            if "namespace" not in self.model_fields_set:
                self.namespace = f"retriever-{secrets.token_hex(4)}"
        if not isinstance(self.k, int) or self.k < 1:
            raise InvalidInputError(f"k must be positive, got {self.k}")
        if self.filter is not None and not (isinstance(self.filter, dict) or callable(self.filter)):
            raise InvalidInputError("filter must be a dict of metadata values or a callable(metadata) -> bool")
        self._corpus = InternalizedCorpus(
            self.model, self.store, namespace=self.namespace, excerpt_chars=self.excerpt_chars, ttl=self.reference_ttl
        )
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_documents(cls, documents: Iterable[Document], model: Any, **kwargs: Any) -> HyperLoRARetriever:
        """Build a retriever and internalize ``documents`` into it."""
        retriever = cls(model=model, **kwargs)
        retriever.add_documents(list(documents))
        return retriever

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        model: Any,
        metadatas: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> HyperLoRARetriever:
        texts = list(texts)
        metas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        docs = [Document(page_content=t, metadata=dict(m)) for t, m in zip(texts, metas, strict=True)]
        return cls.from_documents(docs, model, **kwargs)

    # ------------------------------------------------------------------ writes
    def add_documents(self, documents: Sequence[Document]) -> list[str]:
        """Internalize each document (long ones as several passages); return the adapter ids.

        A document already in this namespace (same text) is not internalized again.
        """
        if isinstance(documents, Document):
            raise InvalidInputError("add_documents takes a list of Documents")
        texts: list[str] = []
        metas: list[dict[str, Any]] = []
        documents = list(documents)
        for doc in documents:
            if not isinstance(doc, Document):
                raise InvalidInputError(f"expected Document objects, got {type(doc).__name__}")
        # The corpus's checks (size limit, empty text, non-text) before splitting: splitting
        # counts tokens, which for a 10 MB document meant 340k tokenizer calls before the refusal.
        self._corpus.check_documents([d.page_content for d in documents], [dict(d.metadata) for d in documents])
        for doc in documents:
            meta = dict(doc.metadata)
            if doc.id is not None:
                meta.setdefault("document_id", doc.id)
            parts = (
                split_passages(doc.page_content, self.chunk_tokens, self.model.count_tokens)
                if self.chunk_tokens
                else [doc.page_content]
            )
            for i, part in enumerate(parts):
                texts.append(part)
                metas.append({**meta, "chunk": i, "chunks": len(parts)} if len(parts) > 1 else meta)
        if not texts:
            return []
        return self._corpus.add_texts(texts, metas, consolidate=self.consolidate, progress=self.consolidate == "now")

    async def aadd_documents(self, documents: Sequence[Document]) -> list[str]:
        """``add_documents`` in a worker thread: internalizing is compute the loop must not run."""
        return await asyncio.to_thread(self.add_documents, documents)

    def add_texts(self, texts: Iterable[str], metadatas: Sequence[dict[str, Any]] | None = None) -> list[str]:
        texts = list(texts)
        metas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        return self.add_documents(
            [Document(page_content=t, metadata=dict(m)) for t, m in zip(texts, metas, strict=True)]
        )

    def delete(self, ids: Sequence[str]) -> None:
        """Remove adapters (by the ids ``add_documents`` returned) from the store and the index."""
        self._corpus.delete(list(ids))

    def __len__(self) -> int:
        return len(self._corpus)

    # ------------------------------------------------------------------ retrieval
    def _matches(self, metadata: dict[str, Any], where: Any) -> bool:
        if where is None:
            return True
        if callable(where):
            return bool(where(metadata))
        return all(metadata.get(key) == value for key, value in where.items())

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        filter: Any = None,  # noqa: A002  (the vector-store keyword)
    ) -> list[Document]:
        k = self.k if k is None else k
        if not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be positive, got {k}")
        where = self.filter if filter is None else filter
        if where is not None and not (isinstance(where, dict) or callable(where)):
            raise InvalidInputError("filter must be a dict of metadata values or a callable(metadata) -> bool")
        # With a filter, rank everything and keep the top k that match: filtering the top k
        # would return fewer documents than exist (and never another tenant's).
        hits = self._corpus.search(query, k if where is None else max(k, len(self._corpus)))
        hits = [h for h in hits if self.min_score is None or h.score > self.min_score]
        hits = relative_cutoff([h for h in hits if self._matches(h.metadata, where)][:k], self.relative_score_cutoff)
        docs = []
        for hit in hits:
            content = hit.reference if self.mode == "reference" else f"{hit.reference}\n{hit.excerpt}"
            metadata = {
                **hit.metadata,
                "adapter_id": hit.adapter_id,
                "namespace": hit.namespace,
                "score": hit.score,
                "score_type": "bm25",
                "reference": hit.reference,
            }
            metadata.setdefault("source", "")
            docs.append(Document(page_content=content, metadata=metadata, id=hit.adapter_id))
        return docs
