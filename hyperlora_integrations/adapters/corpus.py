"""Framework-free core of the internalizing retrievers and of reference resolution.

``InternalizedCorpus`` internalizes documents into a store namespace and ranks them for a query
(BM25), handing out signed references instead of text. ``ReferenceResolver`` is the other end:
the chat model / LLM wrappers pass it the prompt; it strips references, verifies them and returns
the adapters to activate for that call. The LangChain and LlamaIndex classes are thin shells
around these two.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..errors import (
    AdapterNotFoundError,
    DocumentTooLargeError,
    EmptyDocumentError,
    HypernetworkMissingError,
    InvalidInputError,
)
from ..lora import Adapter, content_hash
from .references import LOOSE_RE, REF_RE, Reference, strip_references
from .retrieval import BM25Index, top_passages
from .store import AdapterStore, check_name, check_text, store_signer

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


CONSOLIDATE_MODES = ("background", "now", False)


def _consolidate_mode(value: str | bool | None) -> str | None:
    """Normalise ``consolidate=``: "background" / "now" / None (off); ``True`` means "background"."""
    if value is True:
        return "background"
    if value is False or value is None:
        return None
    if value in ("background", "now"):
        return value
    raise InvalidInputError(f"consolidate must be one of {CONSOLIDATE_MODES}, got {value!r}")


def relative_cutoff(hits: Sequence[Any], cutoff: float | None) -> list[Any]:
    """Drop hits scoring below ``cutoff`` times the best hit's score (hits sorted best first).

    Why: an unrelated document's adapter is not a harmless extra passage -- it changes the
    weights. Measured on the fictional fixture, another document's consolidated adapter raises
    gold-answer NLL above having no document at all, so with k=4 and one relevant document,
    three harmful adapters would be active (docs/doc-to-lora.md, "Several adapters at once").
    """
    if cutoff is not None and not (isinstance(cutoff, (int, float)) and 0.0 <= cutoff <= 1.0):
        raise InvalidInputError(f"relative_score_cutoff must be in [0, 1] or None, got {cutoff!r}")
    if cutoff is None or not hits:
        return list(hits)
    best = max(h.score for h in hits)
    return [h for h in hits if h.score >= cutoff * best]


@dataclass
class Hit:
    """One retrieved document: its reference (what goes in the prompt) and what we know of it."""

    adapter_id: str
    namespace: str
    score: float
    reference: str
    excerpt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def document_id(namespace: str, text: str) -> str:
    """A document's adapter id: deterministic, so a queued document's id is known at once."""
    return content_hash(f"{namespace}\x00{text}")[:32]


class InternalizedCorpus:
    """Documents internalized into adapters in one namespace of a store, searchable by BM25.

    ``max_document_chars`` refuses larger documents before any tokenization (a typed
    ``DocumentTooLargeError`` in microseconds, instead of minutes of tokenizing and hours of
    internalizing): see docs/reliability.md.
    """

    def __init__(
        self,
        model: HyperLoRAModel,
        store: AdapterStore | None = None,
        *,
        namespace: str = "default",
        excerpt_chars: int = 300,
        ttl: float | None = 3600.0,
        max_document_chars: int = 2_000_000,
    ) -> None:
        self.model = model
        self.store = store if store is not None else AdapterStore()
        self.namespace = check_name(namespace, "namespace")
        self.excerpt_chars = excerpt_chars
        self.max_document_chars = max_document_chars
        self.signer = store_signer(self.store, ttl=ttl)
        self.index = BM25Index()
        self._meta: dict[str, dict[str, Any]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Index the documents of this namespace that other corpora or processes have added.

        Queued (and failed) documents are searchable too: they answer by context. The queue is
        read before the stored adapters, so a job finishing in between is seen in one of them.
        """
        jobs = self.store.jobs(namespace=self.namespace, states=("queued", "running", "failed"), kind="document")
        for job in jobs:
            self.index.add(job.id, job.payload)
            self._meta[job.id] = dict(job.options.get("user_metadata") or {})
        for meta in self.store.list(namespace=self.namespace, kind="document"):
            try:
                text = self.store.text(meta.id, namespace=self.namespace) or ""
            except AdapterNotFoundError:  # deleted meanwhile
                continue
            self.index.add(meta.id, text)
            self._meta[meta.id] = dict(meta.model_extra or {}).get("user_metadata", {})

    @property
    def worker(self):
        """The background worker of this corpus's store and model (shared, started on demand)."""
        from .worker import worker_for

        return worker_for(self.model, self.store)

    def check_documents(
        self, texts: Sequence[str], metadatas: Sequence[dict[str, Any]] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Validate a batch as ``add_texts`` would (text, emptiness, ``max_document_chars``,
        metadata) without adding anything: what wrappers call before their own per-document work
        (splitting into passages, tokenizing), so a 10 MB document is refused before it, too."""
        return self._validated(texts, metadatas)

    def _validated(
        self, texts: Sequence[str], metadatas: Sequence[dict[str, Any]] | None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Check the whole batch before any work, so a bad item cannot leave half a batch added."""
        if isinstance(texts, (str, bytes, bytearray)):
            raise InvalidInputError("add_texts takes a list of texts, not one string")
        try:
            texts = list(texts)
        except TypeError:
            raise InvalidInputError(f"add_texts takes a list of texts, got {type(texts).__name__}") from None
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        if len(metadatas) != len(texts):
            raise InvalidInputError("texts and metadatas differ in length")
        for i, (text, meta) in enumerate(zip(texts, metadatas, strict=True)):
            check_text(text, f"document {i}")
            if not text.strip():
                raise EmptyDocumentError(f"document {i} is empty or whitespace only")
            if len(text) > self.max_document_chars:
                raise DocumentTooLargeError(
                    f"document {i} has {len(text)} characters, over max_document_chars={self.max_document_chars}"
                )
            if not isinstance(meta, dict):
                raise InvalidInputError(f"metadata {i} must be a dict, got {type(meta).__name__}")
            try:
                json.dumps(meta)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"metadata {i} is not JSON-serialisable: {exc}") from None
        return texts, metadatas

    def add_texts(
        self,
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]] | None = None,
        *,
        background: bool = False,
        consolidate: str | bool = False,
        progress: bool | None = None,
    ) -> list[str]:
        """Internalize each text (skipping ones already stored) and return their adapter ids.

        With ``background=True`` the texts are only queued (persistently) and the ids returned at
        once; the store's background worker internalizes them oldest first. Until then a
        reference to one is answered from its text (``ReferenceResolver``, ``served_by="context"``).

        ``consolidate`` learns each document into its adapter by gradient steps (``consolidation``):
        ``"background"`` stores the instant hypernetwork adapter now (when the model has a
        hypernetwork and ``background`` is false) and queues the consolidation; ``"now"`` blocks
        until every new document is consolidated (a tqdm bar with ``progress``); ``False`` keeps
        the instant adapter only. A model without a Doc-to-LoRA hypernetwork needs ``consolidate``.
        """
        mode = _consolidate_mode(consolidate)
        if mode is None and self.model.d2l is None:
            raise HypernetworkMissingError(
                "this model has no Doc-to-LoRA hypernetwork: pass consolidate='background' or 'now' "
                "to learn documents by gradient steps instead"
            )
        texts, metadatas = self._validated(texts, metadatas)
        ids = []
        queued = False
        bar = tqdm(
            total=len(texts), desc="consolidating documents", unit="doc", disable=not (progress and mode == "now")
        )
        for text, meta in zip(texts, metadatas, strict=True):
            existing = self.store.find_by_hash(content_hash(text), namespace=self.namespace)
            if existing is not None:
                self.index.add(existing, text)
                self._meta.setdefault(existing, dict(meta))
                ids.append(existing)
                if mode == "background":  # an instant adapter stored earlier gets consolidated now
                    queued |= self._enqueue_consolidation(existing, text, meta)
                elif mode == "now" and not self.store.metadata(existing, namespace=self.namespace).model_extra.get(
                    "consolidated"
                ):
                    self._consolidate_now(existing, text, meta)
                bar.update(1)
                continue
            adapter_id = document_id(self.namespace, text)
            if mode == "now":
                self._consolidate_now(adapter_id, text, meta)
            elif mode == "background":
                if not background and self.model.d2l is not None:
                    self._put_instant(adapter_id, text, meta)
                queued |= self._enqueue_consolidation(adapter_id, text, meta)
            elif background:
                queued |= self._enqueue("document", adapter_id, text, meta)
            else:
                self._put_instant(adapter_id, text, meta)
            self.index.add(adapter_id, text)
            self._meta[adapter_id] = dict(meta)
            ids.append(adapter_id)
            bar.update(1)
        bar.close()
        if queued:
            self.worker.start().wake()
        return ids

    def _put_instant(self, adapter_id: str, text: str, meta: dict[str, Any]) -> None:
        adapter = self.model.internalize(text, source=str(meta.get("source", "")))
        adapter.metadata.id = adapter_id
        adapter.metadata.user_metadata = dict(meta)
        self.store.put(adapter, namespace=self.namespace, text=text)

    def _consolidate_now(self, adapter_id: str, text: str, meta: dict[str, Any]) -> None:
        adapter = self.model.consolidate(text, source=str(meta.get("source", "")), progress=False)
        adapter.metadata.id = adapter_id
        adapter.metadata.user_metadata = dict(meta)
        self.store.put(adapter, namespace=self.namespace, text=text)

    def _enqueue_consolidation(self, adapter_id: str, text: str, meta: dict[str, Any]) -> bool:
        return self._enqueue("consolidate", adapter_id, text, meta)

    def _enqueue(self, kind: str, adapter_id: str, text: str, meta: dict[str, Any]) -> bool:
        return self.store.enqueue(
            kind,
            adapter_id,
            text,
            namespace=self.namespace,
            content_hash=content_hash(text),
            options={"source": str(meta.get("source", "")), "user_metadata": dict(meta)},
            fingerprint=self.model.fingerprint,
        )

    def consolidating(self) -> list[str]:
        """Ids of this namespace's documents whose consolidation is queued or running."""
        return [job.id for job in self.store.pending(namespace=self.namespace, kind="consolidate")]

    def pending(self) -> list[str]:
        """Ids of this namespace's documents still waiting for their adapter, oldest first."""
        return [job.id for job in self.store.pending(namespace=self.namespace, kind="document")]

    def failed(self) -> dict[str, str]:
        """Ids of documents whose internalization failed, with the error (they stay context-served)."""
        return {job.id: job.error or "" for job in self.store.failed(namespace=self.namespace)}

    def drain(self, *, progress: bool = False, timeout: float | None = None) -> int:
        """Internalize everything queued now, in this thread (see ``worker.drain``)."""
        return self.worker.drain(progress=progress, timeout=timeout)

    def delete(self, adapter_ids: Sequence[str]) -> None:
        """Delete documents; a queued one is cancelled (its adapter will never be made)."""
        if isinstance(adapter_ids, str):
            raise InvalidInputError("delete takes a list of ids, not one string")
        for adapter_id in adapter_ids:
            self.store.remove(adapter_id, namespace=self.namespace)
            self.index.remove(adapter_id)
            self._meta.pop(adapter_id, None)

    def search(self, query: str, k: int = 4) -> list[Hit]:
        if not isinstance(k, int) or k < 0:
            raise InvalidInputError(f"k must be a non-negative int, got {k!r}")
        check_text(query, "query")
        hits = []
        ranked = self.index.search(query, k)
        for adapter_id, score in ranked:
            try:
                text = self.store.text(adapter_id, namespace=self.namespace) or ""
            except AdapterNotFoundError:  # deleted by another process since we indexed it
                self.index.remove(adapter_id)
                continue
            hits.append(
                Hit(
                    adapter_id=adapter_id,
                    namespace=self.namespace,
                    score=score,
                    reference=self.signer.issue(self.namespace, adapter_id),
                    excerpt=" ".join(text[: self.excerpt_chars].split()),
                    metadata=dict(self._meta.get(adapter_id, {})),
                )
            )
        return hits

    def __len__(self) -> int:
        return len(self.index)


SERVE_PENDING = ("context", "instant")


def served_label(adapter: Adapter) -> str:
    """How an adapter serves its document: "consolidated" (learned by gradient steps) or "instant"."""
    return "consolidated" if (adapter.metadata.model_extra or {}).get("consolidated") else "instant"


@dataclass
class Resolution:
    """What the references in one call's prompt resolved to.

    ``messages`` are the prompt with every reference-shaped string removed; ``adapters`` are the
    verified ones to activate and ``adapter_references`` the reference each came from (same
    order, so ``adapter_references[i].namespace`` is where ``adapters[i]`` lives); ``served``
    says per (namespace, adapter id) how it was served: by its adapter ("consolidated", or
    "instant" for a hypernetwork adapter not consolidated yet) or, while its adapter is being
    made or consolidated, by its text put in the prompt in the reference's place ("context"); ``rejected`` counts forged, expired or foreign references.

    The same id may exist in two namespaces (ids are per namespace), so ``served`` is keyed by
    both. ``served_by`` is the flat, JSON-friendly view the chat model and LLM report: keyed by
    adapter id, or by ``"<namespace>/<id>"`` for an id referenced from several namespaces in the
    call (``/`` cannot occur in a name, so the keys never collide).
    """

    messages: list[dict[str, str]]
    adapters: list[Adapter]
    references: list[Reference]
    served: dict[tuple[str, str], str] = field(default_factory=dict)
    rejected: int = 0
    adapter_references: list[Reference] = field(default_factory=list)

    @property
    def served_by(self) -> dict[str, str]:
        ids = [adapter_id for _, adapter_id in self.served]
        return {
            (f"{ns}/{adapter_id}" if ids.count(adapter_id) > 1 else adapter_id): how
            for (ns, adapter_id), how in self.served.items()
        }


class ReferenceResolver:
    """Verifies references found in prompts and loads their adapters from the store.

    ``namespaces`` is what this resolver may activate: a multi-tenant service gives each
    tenant's resolver that tenant's namespaces, so a reference copied from another tenant is
    rejected (its namespace is inside the signature, so it cannot be relabelled either).
    ``fallback_chars`` bounds the text put in the prompt for a document whose adapter is not
    ready yet: a longer document contributes its passages that best match the message.
    """

    def __init__(
        self,
        store: AdapterStore,
        *,
        namespaces: Sequence[str] | None = None,
        ttl: float | None = 3600.0,
        fallback_chars: int | None = 8000,
        serve_pending: str = "context",
    ) -> None:
        if isinstance(namespaces, str):
            raise InvalidInputError("namespaces takes a list of namespaces, not one string")
        if serve_pending not in SERVE_PENDING:
            raise InvalidInputError(f"serve_pending must be one of {SERVE_PENDING}, got {serve_pending!r}")
        self.serve_pending = serve_pending
        self.store = store
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.signer = store_signer(store, ttl=ttl)
        self.fallback_chars = fallback_chars

    def _fallback_text(self, ref: Reference, query: str = "") -> str | None:
        """Source text for a reference whose adapter is not ready yet (None if unknown)."""
        pending = getattr(self.store, "pending_text", None)
        text = pending(ref.adapter_id, namespace=ref.namespace) if pending else None
        if text is None or self.fallback_chars is None or len(text) <= self.fallback_chars:
            return text
        return top_passages(text, query, self.fallback_chars)

    def _load(self, ref: Reference, query: str) -> tuple[Adapter | None, str | None]:
        """(adapter, None) when ready, (None, text) while queued, (None, None) when unknown.

        A document whose consolidation is pending has an instant adapter that does not yet carry
        its content; with ``serve_pending="context"`` its text is served instead until the
        consolidated adapter lands.
        """
        if self.serve_pending == "context":
            job = self.store.job(ref.adapter_id, namespace=ref.namespace)
            if job is not None and job.kind == "consolidate":
                text = self._fallback_text(ref, query)
                if text is not None:
                    return None, text
        try:
            return self.store.get(ref.adapter_id, namespace=ref.namespace), None
        except AdapterNotFoundError:
            text = self._fallback_text(ref, query)
        if text is not None:
            return None, text
        try:  # the job may have completed between the two lookups
            return self.store.get(ref.adapter_id, namespace=ref.namespace), None
        except AdapterNotFoundError:
            return None, None

    def resolve(self, messages: Sequence[dict[str, str]]) -> Resolution:
        """Strip references from all messages and collect the adapters of the verified ones."""
        if isinstance(messages, (str, bytes)):
            raise InvalidInputError("resolve takes a list of messages; use resolve_text for one string")
        adapters: list[Adapter] = []
        adapter_refs: list[Reference] = []
        refs: list[Reference] = []
        served: dict[tuple[str, str], str] = {}
        rejected = 0
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise InvalidInputError(f"bad message {m!r}: need a dict with str content")
            content = check_text(m["content"], "message content")
            query = LOOSE_RE.sub(" ", content)
            pieces, last = [], 0
            for match in REF_RE.finditer(content):
                pieces.append(content[last : match.start()])
                last = match.end()
                ref = self.signer.verify(match, self.namespaces)
                if ref is None:
                    rejected += 1
                    continue
                if ref in refs:
                    continue
                adapter, text = self._load(ref, query)
                if adapter is not None:
                    adapters.append(adapter)
                    adapter_refs.append(ref)
                    served[(ref.namespace, ref.adapter_id)] = served_label(adapter)
                elif text is not None:
                    pieces.append(text)
                    served[(ref.namespace, ref.adapter_id)] = "context"
                else:
                    rejected += 1
                    continue
                refs.append(ref)
            pieces.append(content[last:])
            clean, lookalikes = strip_references("".join(pieces))
            rejected += lookalikes  # malformed lookalikes, and any that stripping joined together
            out.append({**m, "content": clean})
        return Resolution(
            messages=out,
            adapters=adapters,
            references=refs,
            served=served,
            rejected=rejected,
            adapter_references=adapter_refs,
        )

    def resolve_text(self, text: str) -> Resolution:
        return self.resolve([{"role": "user", "content": text}])
