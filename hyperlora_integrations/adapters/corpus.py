"""Framework-free core of the internalizing retrievers and of reference resolution.

``InternalizedCorpus`` internalizes documents into a store namespace and ranks them for a query
(BM25), handing out signed references instead of text. ``ReferenceResolver`` is the other end:
the chat model / LLM wrappers pass it the prompt; it strips references, verifies them and returns
the adapters to activate for that call. The LangChain and LlamaIndex classes are thin shells
around these two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import AdapterNotFoundError, InvalidInputError
from ..lora import Adapter, content_hash
from .references import LOOSE_RE, REF_RE, Reference
from .retrieval import BM25Index
from .store import AdapterStore, check_name, store_signer

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


@dataclass
class Hit:
    """One retrieved document: its reference (what goes in the prompt) and what we know of it."""

    adapter_id: str
    namespace: str
    score: float
    reference: str
    excerpt: str
    metadata: dict[str, Any] = field(default_factory=dict)


class InternalizedCorpus:
    """Documents internalized into adapters in one namespace of a store, searchable by BM25."""

    def __init__(
        self,
        model: HyperLoRAModel,
        store: AdapterStore | None = None,
        *,
        namespace: str = "default",
        excerpt_chars: int = 300,
        ttl: float | None = 3600.0,
    ) -> None:
        self.model = model
        self.store = store if store is not None else AdapterStore()
        self.namespace = check_name(namespace, "namespace")
        self.excerpt_chars = excerpt_chars
        self.signer = store_signer(self.store, ttl=ttl)
        self.index = BM25Index()
        self._meta: dict[str, dict[str, Any]] = {}
        for meta in self.store.list(namespace=self.namespace, kind="document"):
            text = self.store.text(meta.id, namespace=self.namespace) or ""
            self.index.add(meta.id, text)
            self._meta[meta.id] = dict(meta.model_extra or {}).get("user_metadata", {})

    def add_texts(self, texts: Sequence[str], metadatas: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Internalize each text (skipping ones already stored) and return their adapter ids."""
        if isinstance(texts, str):
            raise InvalidInputError("add_texts takes a list of texts, not one string")
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        if len(metadatas) != len(texts):
            raise InvalidInputError("texts and metadatas differ in length")
        ids = []
        for text, meta in zip(texts, metadatas, strict=True):
            existing = self.store.find_by_hash(content_hash(text), namespace=self.namespace)
            if existing is not None:
                ids.append(existing)
                continue
            adapter = self.model.internalize(text, source=str(meta.get("source", "")))
            adapter.metadata.id = content_hash(f"{self.namespace}\x00{text}")[:32]
            adapter.metadata.user_metadata = dict(meta)
            self.store.put(adapter, namespace=self.namespace, text=text)
            self.index.add(adapter.id, text)
            self._meta[adapter.id] = dict(meta)
            ids.append(adapter.id)
        return ids

    def delete(self, adapter_ids: Sequence[str]) -> None:
        for adapter_id in adapter_ids:
            self.store.remove(adapter_id, namespace=self.namespace)
            self.index.remove(adapter_id)
            self._meta.pop(adapter_id, None)

    def search(self, query: str, k: int = 4) -> list[Hit]:
        if not isinstance(query, str):
            raise InvalidInputError("query must be a string")
        hits = []
        for adapter_id, score in self.index.search(query, k):
            text = self.store.text(adapter_id, namespace=self.namespace) or ""
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


@dataclass
class Resolution:
    """What the references in one call's prompt resolved to.

    ``messages`` are the prompt with every reference-shaped string removed; ``adapters`` are the
    verified ones to activate; ``served_by`` says per adapter id whether the adapter served it
    ("adapter") or, while its adapter is still being made, its text was put in the prompt in the
    reference's place ("context"); ``rejected`` counts forged, expired or foreign references.
    """

    messages: list[dict[str, str]]
    adapters: list[Adapter]
    references: list[Reference]
    served_by: dict[str, str] = field(default_factory=dict)
    rejected: int = 0


class ReferenceResolver:
    """Verifies references found in prompts and loads their adapters from the store."""

    def __init__(
        self, store: AdapterStore, *, namespaces: Sequence[str] | None = None, ttl: float | None = 3600.0
    ) -> None:
        self.store = store
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.signer = store_signer(store, ttl=ttl)

    def _fallback_text(self, ref: Reference) -> str | None:
        """Source text for a reference whose adapter is not ready yet (None if unknown)."""
        pending = getattr(self.store, "pending_text", None)
        return pending(ref.adapter_id, namespace=ref.namespace) if pending else None

    def resolve(self, messages: Sequence[dict[str, str]]) -> Resolution:
        """Strip references from all messages and collect the adapters of the verified ones."""
        adapters: list[Adapter] = []
        refs: list[Reference] = []
        served: dict[str, str] = {}
        rejected = 0
        out = []
        for m in messages:
            pieces, last = [], 0
            for match in REF_RE.finditer(m["content"]):
                pieces.append(m["content"][last : match.start()])
                last = match.end()
                ref = self.signer.verify(match, self.namespaces)
                if ref is None:
                    rejected += 1
                    continue
                if ref in refs:
                    continue
                try:
                    adapters.append(self.store.get(ref.adapter_id, namespace=ref.namespace))
                    served[ref.adapter_id] = "adapter"
                    refs.append(ref)
                except AdapterNotFoundError:
                    text = self._fallback_text(ref)
                    if text is None:
                        rejected += 1
                        continue
                    pieces.append(text)
                    served[ref.adapter_id] = "context"
                    refs.append(ref)
            pieces.append(m["content"][last:])
            content = "".join(pieces)
            rejected += len(LOOSE_RE.findall(content))  # malformed lookalikes
            out.append({**m, "content": LOOSE_RE.sub("", content)})
        return Resolution(messages=out, adapters=adapters, references=refs, served_by=served, rejected=rejected)

    def resolve_text(self, text: str) -> Resolution:
        return self.resolve([{"role": "user", "content": text}])
