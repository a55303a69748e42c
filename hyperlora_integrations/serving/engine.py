"""``ServingEngine``: what one replica does for a request, without Ray or HTTP.

Kept free of Ray so every rule (which adapters a ``model`` value names, what a reference in a
message activates, when a prompt is too long, what a bad document does to the store) is tested
in-process in milliseconds; the Ray Serve deployment (``app``) only adds multiplexed adapter
loading, threads and HTTP around it.

A request is served in three steps: ``targets`` names the adapters (cheap: index look-ups, so
a 404 costs nothing), the caller loads them (the deployment through Ray Serve's per-replica
LRU), ``plan`` resolves references and checks lengths, then ``run`` decodes. Everything that
can reject a request happens before the first token, so a streaming client gets a proper
status code instead of an error in the middle of a 200 stream.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapters.corpus import InternalizedCorpus, ReferenceResolver
from ..adapters.routing import route
from ..adapters.store import AdapterStore, check_name
from ..batching import AdapterScope, achunks_from_tokens
from ..chat import encode_text, last_user_text
from ..errors import AdapterNotFoundError, InvalidInputError
from ..generation import Chunk, SamplingParams, chunks_from_tokens, stream_tokens
from ..lora import Adapter
from .schemas import ChatCompletionRequest, CompletionRequest, ContextLengthExceededError, DocumentsRequest

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


@dataclass(frozen=True)
class Target:
    """One adapter a request names: stored (``text`` None) or still queued (served from ``text``)."""

    namespace: str
    id: str
    text: str | None = None
    version: str = ""

    @property
    def key(self) -> str:
        """The adapter's name across namespaces: what requests for it are routed by."""
        return f"{self.namespace}/{self.id}"

    @property
    def load_key(self) -> str:
        """The key a loaded copy is cached under: a replaced adapter (e.g. consolidated) is a new key."""
        return f"{self.key}@{self.version}"

    @classmethod
    def from_load_key(cls, load_key: str) -> Target:
        key, _, version = load_key.rpartition("@")
        namespace, _, adapter_id = key.partition("/")
        return cls(namespace, adapter_id, None, version)


@dataclass
class Plan:
    """A request resolved and checked, ready to decode."""

    kind: str  # "chat" | "completion"
    model: str
    prompt_ids: list[int]
    adapters: list[Adapter]
    params: SamplingParams
    sampling: dict[str, Any]  # the keyword arguments ``params`` was made from (for ``stream_chunks``)
    messages: list[dict[str, str]] | None = None  # chat: references stripped
    context: str | None = None  # chat: text of queued documents, stuffed before the first user turn
    served_by: dict[str, str] = field(default_factory=dict)
    rejected_references: int = 0

    def info(self) -> dict[str, Any]:
        """What the response reports under ``hyperlora``: which adapters served the call, and how."""
        return {
            "adapters": [a.id for a in self.adapters],
            "served_by": self.served_by,
            "rejected_references": self.rejected_references,
        }


class ServingEngine:
    """Serves OpenAI-shaped requests from one ``HyperLoRAModel`` and one ``AdapterStore``.

    ``namespaces[0]`` is where ``POST /v1/documents`` puts documents; a ``model`` value may name
    an adapter of any listed namespace by id (first match in order), as ``namespace/id``, or a
    skill by its name. ``max_prompt_tokens`` caps prompts below the context window.
    ``select_adapters`` (default, as ``ChatHyperLoRA``): of the adapters that signed references in
    a chat request activate, keep those that make the user's last message more likely
    (``adapters.routing``); adapters named by ``model``/``adapters`` are always used.
    """

    def __init__(
        self,
        model: HyperLoRAModel,
        store: AdapterStore,
        *,
        namespaces: Sequence[str] = ("default", "skills"),
        served_model_name: str | None = None,
        default_max_tokens: int = 256,
        default_temperature: float = 0.0,
        max_prompt_tokens: int | None = None,
        reference_ttl: float | None = 3600.0,
        select_adapters: bool = True,
    ) -> None:
        if isinstance(namespaces, str) or not namespaces:
            raise InvalidInputError("namespaces takes a non-empty list of namespaces")
        self.model = model
        self.store = store
        self.namespaces = [check_name(ns, "namespace") for ns in namespaces]
        self.base_name = served_model_name or model.name
        self.default_max_tokens = default_max_tokens
        self.default_temperature = default_temperature
        self.max_prompt_tokens = max_prompt_tokens
        self.resolver = ReferenceResolver(store, namespaces=self.namespaces, ttl=reference_ttl)
        self.select_adapters = select_adapters
        self._corpus: InternalizedCorpus | None = None

    @property
    def corpus(self) -> InternalizedCorpus:
        """The documents namespace (built on first use: it indexes every stored text)."""
        if self._corpus is None:
            self._corpus = InternalizedCorpus(self.model, self.store, namespace=self.namespaces[0])
        return self._corpus

    # ------------------------------------------------------------------ naming
    def _find(self, namespace: str, adapter_id: str) -> Target | None:
        try:
            meta = self.store.metadata(adapter_id, namespace=namespace)
        except AdapterNotFoundError:
            meta = None
        if meta is not None:
            version = hashlib.sha256(meta.model_dump_json().encode()).hexdigest()[:16]
            return Target(namespace, adapter_id, version=version)
        text = self.store.pending_text(adapter_id, namespace=namespace)
        return Target(namespace, adapter_id, text) if text is not None else None

    def _skill(self, name: str) -> Target | None:
        for namespace in self.namespaces:
            for meta in reversed(self.store.list(namespace=namespace, kind="skill")):  # newest first
                if (meta.model_extra or {}).get("skill_name") == name:
                    return self._find(namespace, meta.id)
        return None

    def target(self, name: str) -> Target:
        """The adapter a ``model`` value (or an ``adapters`` entry) names; 404 if none."""
        if not isinstance(name, str) or not name:
            raise InvalidInputError("an adapter name must be a non-empty string")
        found = None
        if "/" in name:
            namespace, _, adapter_id = name.partition("/")
            if namespace in self.namespaces and _valid(adapter_id):
                found = self._find(namespace, adapter_id)
        elif _valid(name):
            found = next((t for ns in self.namespaces if (t := self._find(ns, name)) is not None), None)
            found = found or self._skill(name)
        if found is None:
            raise AdapterNotFoundError(
                f"model {name!r} is neither the base model {self.base_name!r} nor an adapter of this server; "
                "GET /v1/models lists both"
            )
        return found

    def targets(self, model: str, adapters: Sequence[str] = ()) -> list[Target]:
        """Adapters of ``model`` (none for the base model) and of the ``adapters`` extra field."""
        names = ([] if model == self.base_name else [model]) + list(adapters)
        out: list[Target] = []
        for name in names:
            target = self.target(name)
            if target not in out:
                out.append(target)
        return out

    def load(self, target: Target) -> Adapter:
        """A stored target's adapter, checked against this model."""
        adapter = self.store.get(target.id, namespace=target.namespace)
        adapter.check_base(self.model.name, self.model.fingerprint)
        return adapter

    # ------------------------------------------------------------------ planning
    def _sampling(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> dict[str, Any]:
        room = self.model.max_context - prompt_len
        limit = self.max_prompt_tokens
        if limit is not None and prompt_len > limit:
            raise ContextLengthExceededError(
                f"prompt of {prompt_len} tokens is over this server's max_prompt_tokens={limit}; "
                "internalize long documents (POST /v1/documents) instead of sending them"
            )
        requested = req.new_tokens()
        new_tokens = requested if requested is not None else min(self.default_max_tokens, room)
        if room < 1 or new_tokens > room:
            raise ContextLengthExceededError(
                f"prompt of {prompt_len} tokens + {new_tokens} new tokens exceeds the {self.model.max_context}-token "
                "context; shorten the prompt, lower max_tokens, or internalize long documents (POST /v1/documents)"
            )
        sampling: dict[str, Any] = {
            "max_new_tokens": new_tokens,
            "temperature": self.default_temperature if req.temperature is None else req.temperature,
            "stop": req.stop or (),
            "seed": req.seed,
        }
        if req.top_p is not None and req.top_p < 1:
            sampling["top_p"] = req.top_p
        return sampling

    def plan(
        self, req: ChatCompletionRequest | CompletionRequest, targets: Sequence[Target], loaded: Sequence[Adapter]
    ):
        """Resolve references, put queued documents' text in the prompt, encode and check lengths."""
        adapters = list(loaded)
        served = {t.key: "adapter" for t in targets if t.text is None}
        contexts = [t.text for t in targets if t.text is not None]
        served.update({t.key: "context" for t in targets if t.text is not None})
        if isinstance(req, ChatCompletionRequest):
            resolution = self.resolver.resolve([m.core() for m in req.messages])
            if (
                self.select_adapters
            ):  # as ChatHyperLoRA: references whose adapter does not explain the question are skipped
                resolution = route(self.model, resolution, last_user_text(resolution.messages))
            for adapter in resolution.adapters:
                if all(a.id != adapter.id for a in adapters):
                    adapters.append(adapter)
            for key, how in resolution.served_by.items():  # keyed by id, or (namespace, id)
                served.setdefault(key if isinstance(key, str) else "/".join(map(str, key)), how)
            context = "\n\n".join(contexts) if contexts else None
            messages = resolution.messages
            ids = self.model.encode(messages, context=context)
            rejected = resolution.rejected
            kind = "chat"
        else:
            messages, context = None, None
            text = req.text()
            prefix = "".join(c + "\n\n" for c in contexts)
            ids = encode_text(self.model.tokenizer, prefix + text) if (prefix + text) else []
            rejected = 0
            kind = "completion"
            if not ids:
                raise InvalidInputError("prompt is empty")
        sampling = self._sampling(req, len(ids))
        params = SamplingParams(**sampling)
        self.model.activate(adapters)  # checks base model and shapes before any decoding
        return Plan(kind, req.model, ids, adapters, params, sampling, messages, context, served, rejected)

    # ------------------------------------------------------------------ decoding
    def run(self, plan: Plan) -> Iterator[Chunk]:
        """Decode ``plan``, its adapters active for this call only (blocking; any thread).

        Chat goes through ``HyperLoRAModel.stream_chunks``; a raw completion through the same
        decoder on its pre-encoded ids. With ``model.enable_batching()`` both join the model's
        continuous batch (one row per request, each with its own adapters); without it each
        request runs its own token loop.
        """
        model = self.model
        if plan.kind == "chat":
            yield from model.stream_chunks(plan.messages, plan.adapters, context=plan.context, **plan.sampling)
            return
        scope = AdapterScope(model.injector, plan.adapters)
        batcher = getattr(model, "_batcher", None)
        if batcher is None:
            yield from stream_tokens(model.model, model.tokenizer, plan.prompt_ids, plan.params, scope, model._eos_ids)
        else:
            tokens = batcher.tokens(plan.prompt_ids, scope, plan.params, model._eos_ids)
            yield from chunks_from_tokens(tokens, model.tokenizer, plan.params.stop, len(plan.prompt_ids))

    async def astream(self, plan: Plan) -> AsyncIterator[Chunk]:
        """``run`` for asyncio: with batching, tokens arrive on the event loop (no thread per
        request); without it each chunk is computed in a worker thread. Closing the iterator
        (a client that went away) cancels the request's row."""
        model = self.model
        if plan.kind == "chat":
            async for chunk in model.astream_chunks(
                plan.messages, plan.adapters, context=plan.context, **plan.sampling
            ):
                yield chunk
            return
        batcher = getattr(model, "_batcher", None)
        if batcher is not None:
            scope = AdapterScope(model.injector, plan.adapters)
            tokens = batcher.atokens(plan.prompt_ids, scope, plan.params, model._eos_ids)
            async for chunk in achunks_from_tokens(tokens, model.tokenizer, plan.params.stop, len(plan.prompt_ids)):
                yield chunk
            return
        stream = self.run(plan)
        done = object()
        while (chunk := await asyncio.to_thread(next, stream, done)) is not done:
            yield chunk

    # ------------------------------------------------------------------ catalogue and documents
    def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` data: the base model, then every adapter of each namespace.

        ``status`` is ``ready``, ``consolidating`` (usable; a better adapter is being learned) or
        ``queued`` (no adapter yet: answered from the document's text).
        """
        cards = [{"id": self.base_name, "object": "model", "created": 0, "owned_by": "hyperlora", "kind": "base"}]
        for i, namespace in enumerate(self.namespaces):
            by_id: dict[str, dict[str, Any]] = {}
            card = functools.partial(self._card, namespace, i == 0)
            for meta in self.store.list(namespace=namespace):
                by_id[meta.id] = card(meta.id, meta.kind, meta.created_at, "ready")
                if (meta.model_extra or {}).get("skill_name"):
                    by_id[meta.id]["name"] = meta.model_extra["skill_name"]
            for job in self.store.pending(namespace=namespace):
                if job.id in by_id:
                    if job.kind == "consolidate":
                        by_id[job.id]["status"] = "consolidating"
                else:
                    by_id[job.id] = card(
                        job.id, "document" if job.kind == "consolidate" else job.kind, job.created_at, "queued"
                    )
            cards.extend(by_id.values())
        return cards

    def _card(self, namespace: str, first: bool, adapter_id: str, kind: str, created: str, status: str) -> dict:
        return {
            "id": adapter_id if first else f"{namespace}/{adapter_id}",
            "object": "model",
            "created": _epoch(created),
            "owned_by": "hyperlora",
            "kind": kind,
            "namespace": namespace,
            "status": status,
            "parent": self.base_name,
        }

    def add_documents(self, req: DocumentsRequest) -> dict[str, Any]:
        """Internalize (and consolidate) documents into ``namespaces[0]``; their ids are ``model`` values.

        ``consolidate``: ``False``, one hypernetwork pass each before the reply; ``"now"``, also
        learned by gradient steps before the reply; ``"background"``, the instant adapter now and
        a consolidation job queued (the replica's background worker replaces the adapter when
        it is done, and the replicas reload it: a replaced adapter has a new cache key). A corpus
        without ``consolidate`` (an older core) queues the internalization instead, answering
        from the text meanwhile. The corpus validates the whole batch before storing anything, so
        one bad document leaves the store as it was.
        """
        texts = [d.text for d in req.documents]
        metadatas = [d.metadata for d in req.documents]
        corpus = self.corpus
        mode = req.consolidate
        if "consolidate" in inspect.signature(corpus.add_texts).parameters:
            ids = corpus.add_texts(texts, metadatas, consolidate=mode)
        else:
            ids = corpus.add_texts(texts, metadatas, background=mode == "background")
            mode = False
        ns = corpus.namespace
        queued = [i for i in ids if not self.store.contains(i, namespace=ns)]
        consolidating = [i for i in ids if (job := self.store.job(i, namespace=ns)) and job.kind == "consolidate"]
        return {
            "object": "list",
            "ids": ids,
            "queued": queued,
            "consolidating": consolidating,
            "namespace": ns,
            "consolidate": mode,
        }


def _valid(adapter_id: str) -> bool:
    try:
        check_name(adapter_id, "adapter id")
    except InvalidInputError:
        return False
    return True


def _epoch(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return 0


LoadFn = Callable[[Target], Adapter]
