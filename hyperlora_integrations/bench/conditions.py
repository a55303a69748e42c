"""The seven conditions and the one decoding engine they all share.

Every condition answers with the same greedy loop (``Engine.query``), so latency differences
come from what a condition puts in front of the model (nothing, the document, a cached document,
retrieved chunks, an adapter), never from different generation code. Each query generates a fixed
number of tokens, whatever the model would stop at, so "total latency" compares equal work; the
answer scored for quality is the text up to the first end-of-turn token and first line break.

Per-document preparation (prefill, index, internalize, distil) is done once per document in
``DocumentState`` and timed there; a condition's preparation time is the sum of the parts it
uses (the hybrid condition pays for both the adapter and the index).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..adapters.retrieval import BM25Index, tokenize
from ..chat import CONTEXT_SEPARATOR, context_prefix, encode_text
from ..lora import Adapter
from .distill import DistillConfig, DistillResult, distill_document
from .documents import Document, Question
from .memory import kv_cache_bytes


# ---------------------------------------------------------------------- decoding engine
@dataclass
class Outcome:
    answer: str
    ttft_s: float
    total_s: float
    nll: float
    gold_tokens: int
    prompt_tokens: int  # tokens the model attends to before answering
    prefill_tokens: int  # of those, computed by this query (the rest come from a reused cache)
    generated: list[int] = field(default_factory=list)  # all answer_tokens greedy ids


@dataclass
class Prefix:
    """A reusable KV cache of a prompt prefix and the logits after its last token."""

    cache: DynamicCache
    last_logits: torch.Tensor
    ids: list[int]


class Engine:
    """Chunked prefill, fixed-length greedy decoding and gold-answer NLL on the same cache."""

    def __init__(self, model, *, answer_tokens: int = 16, prefill_chunk: int = 2048) -> None:
        self.model = model
        self.lm = model.model
        self.tok = model.tokenizer
        self.answer_tokens = answer_tokens
        self.prefill_chunk = prefill_chunk
        eos = {self.tok.eos_token_id}
        gen = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        eos |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
        self.eos = {e for e in eos if e is not None}
        # consolidated adapters by document id, with the seconds each took: condition 9 uses a
        # neighbour's, which is then not consolidated (or timed) twice
        self.consolidated: dict[str, tuple[Adapter, float]] = {}
        self.device = next(self.lm.parameters()).device

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.lm.config)

    @torch.no_grad()
    def prefill(self, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """Run ``ids`` into ``cache`` in chunks; logits after the last id.

        Chunking is how servers prefill long prompts: the result is the same as one pass, but
        the attention mask stays ``chunk x context`` instead of ``context x context`` (a 32k
        single pass would build a multi-GiB mask on this machine).
        """
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            piece = torch.tensor([ids[i : i + self.prefill_chunk]], device=self.device)
            logits = self.lm(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        if logits is None:
            raise ValueError("nothing to prefill")
        return logits

    def make_prefix(self, ids: list[int]) -> Prefix:
        cache = self.new_cache()
        return Prefix(cache, self.prefill(ids, cache), list(ids))

    def answer_text(self, generated: list[int]) -> str:
        cut = next((i for i, t in enumerate(generated) if t in self.eos), len(generated))
        text = self.tok.decode(generated[:cut], skip_special_tokens=True).strip()
        return text.split("\n", 1)[0].strip()

    @torch.no_grad()
    def query(
        self,
        make_ids: Callable[[], list[int]],
        gold: str,
        *,
        adapters: tuple[Adapter, ...] | list[Adapter] = (),
        prefix: Prefix | None = None,
    ) -> Outcome:
        """Time one query end to end (prompt building included), then score ``gold`` untimed."""
        gold_ids = encode_text(self.tok, gold)
        lm = self.lm
        t0 = time.perf_counter()
        with self.model.activate(adapters):
            ids = make_ids()
            if prefix is not None:
                if ids[: len(prefix.ids)] != prefix.ids:
                    raise AssertionError("prompt does not start with the cached prefix")
                cache, new = prefix.cache, ids[len(prefix.ids) :]
                last = self.prefill(new, cache) if new else prefix.last_logits
            else:
                cache, new = self.new_cache(), ids
                last = self.prefill(new, cache)
            token = int(last.argmax())
            ttft = time.perf_counter() - t0
            generated = [token]
            for _ in range(self.answer_tokens - 1):
                out = lm(input_ids=torch.tensor([[token]], device=self.device), cache=cache, use_cache=True)
                token = int(out.logits[0, -1].argmax())
                generated.append(token)
            total = time.perf_counter() - t0

            # Gold-answer NLL on the same prompt cache: rewind the generated tokens, feed the gold.
            cache.crop(-(self.answer_tokens - 1))
            nll = float(F.cross_entropy(last[None].float(), torch.tensor([gold_ids[0]], device=self.device)))
            if len(gold_ids) > 1:
                out = lm(input_ids=torch.tensor([gold_ids[:-1]], device=self.device), cache=cache, use_cache=True)
                target = torch.tensor(gold_ids[1:], device=self.device)
                nll += float(F.cross_entropy(out.logits[0].float(), target, reduction="sum"))
                cache.crop(-(len(gold_ids) - 1))
        if prefix is not None:
            cache.crop(-len(new))
            if cache.get_seq_length() != len(prefix.ids):
                raise AssertionError("the reused cache was not restored to its prefix")
        return Outcome(self.answer_text(generated), ttft, total, nll, len(gold_ids), len(ids), len(new), generated)


# ---------------------------------------------------------------------- per-document state
class ChunkIndex:
    """Top-k RAG: the document cut into fixed token windows, ranked by BM25 per question."""

    def __init__(self, tokenizer, text: str, chunk_tokens: int) -> None:
        ids = encode_text(tokenizer, text)
        self.chunks = [tokenizer.decode(ids[i : i + chunk_tokens]).strip() for i in range(0, len(ids), chunk_tokens)]
        self.bm25 = BM25Index()
        for i, chunk in enumerate(self.chunks):
            self.bm25.add(str(i), chunk)

    def retrieve(self, question: str, k: int) -> str:
        """The ``k`` best chunks, in document order, as one context string."""
        hits = sorted(int(key) for key, _ in self.bm25.search(question, k))
        return "\n\n".join(self.chunks[i] for i in hits)

    @property
    def nbytes(self) -> int:
        """What the index keeps: chunk texts plus their term-frequency tables, serialised."""
        text = sum(len(c.encode("utf-8")) for c in self.chunks)
        terms = sum(len(json.dumps(Counter(tokenize(c)))) for c in self.chunks)
        return text + terms


@dataclass
class Settings:
    answer_tokens: int = 16
    rag_chunk_tokens: int = 128
    rag_k: int = 4
    d2l_max_rank: int | None = None  # SVD-compress the D2L adapter to this rank (None: keep every chunk's rank)
    distill: DistillConfig = field(default_factory=DistillConfig)


class DocumentState:
    """Lazily built, timed per-document artefacts shared by the conditions that need them."""

    def __init__(self, engine: Engine, doc: Document, settings: Settings, neighbour: Document | None = None) -> None:
        self.engine = engine
        self.neighbour = neighbour  # another document of the same length: condition 9's adapter
        self.model = engine.model
        self.doc = doc
        self.settings = settings
        self.times: dict[str, float] = {}
        self.k = len(context_prefix(self.model.tokenizer))
        self.doc_ids = encode_text(self.model.tokenizer, doc.text)
        self._prefix: Prefix | None = None
        self._index: ChunkIndex | None = None
        self._adapter: Adapter | None = None
        self._distilled: DistillResult | None = None
        self.kv_bytes = 0

    def prefix(self) -> Prefix:
        """Template prefix + document, prefilled once: condition 3's cache and 7's teacher."""
        if self._prefix is None:
            t0 = time.perf_counter()
            ids = context_prefix(self.model.tokenizer) + encode_text(
                self.model.tokenizer, self.doc.text + CONTEXT_SEPARATOR
            )
            self._prefix = self.engine.make_prefix(ids)
            self.times["prefill"] = time.perf_counter() - t0
            self.kv_bytes = kv_cache_bytes(self._prefix.cache)
        return self._prefix

    def index(self) -> ChunkIndex:
        if self._index is None:
            t0 = time.perf_counter()
            self._index = ChunkIndex(self.model.tokenizer, self.doc.text, self.settings.rag_chunk_tokens)
            self.times["index"] = time.perf_counter() - t0
        return self._index

    def adapter(self) -> Adapter:
        if self._adapter is None:
            t0 = time.perf_counter()
            self._adapter = self.model.internalize(
                self.doc.text, source=self.doc.doc_id, progress=False, max_rank=self.settings.d2l_max_rank
            )
            self.times["internalize"] = time.perf_counter() - t0
        return self._adapter

    def distilled(self) -> DistillResult:
        if self._distilled is None:
            prefix = self.prefix()
            d2l = self.model.d2l
            lora = d2l.config.lora if d2l is not None else None
            self._distilled = distill_document(
                self.model,
                self.doc.text,
                self.doc_ids,
                prefix.cache,
                prefix.last_logits,
                self.k,
                targets=tuple(lora.target_modules) if lora else ("down_proj",),
                rank=lora.rank if lora else 8,
                cfg=self.settings.distill,
            )
            self.times["distill_targets"] = self._distilled.targets_s
            self.times["distill_train"] = self._distilled.train_s
        return self._distilled

    def consolidated(self) -> Adapter:
        adapter, self.times["consolidate"] = self._consolidate(self.doc)
        return adapter

    def other_consolidated(self) -> Adapter:
        """The neighbour document's consolidated adapter: the control a generic effect passes."""
        if self.neighbour is None:
            raise ValueError("condition 9 needs another document (DocumentState(neighbour=...))")
        return self._consolidate(self.neighbour)[0]

    def _consolidate(self, doc: Document) -> tuple[Adapter, float]:
        cache = self.engine.consolidated
        if doc.doc_id not in cache:
            t0 = time.perf_counter()
            adapter = self.model.consolidate(doc.text, source=doc.doc_id, progress=False)
            cache[doc.doc_id] = (adapter, time.perf_counter() - t0)
        return cache[doc.doc_id]

    def release_prefix(self) -> None:
        self._prefix = None


# ---------------------------------------------------------------------- the conditions
@dataclass
class Prep:
    seconds: float
    bytes_kept: int
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    key: str
    number: int
    name: str
    description: str
    prepare: Callable[[DocumentState], Prep]
    query: Callable[[DocumentState, Question], Outcome]


def _parts(state: DocumentState, *names: str) -> Prep:
    parts = {n: state.times[n] for n in names}
    return Prep(sum(parts.values()), 0, parts)


def _with_bytes(prep: Prep, nbytes: int) -> Prep:
    prep.bytes_kept = nbytes
    return prep


def _plain(state: DocumentState, q: Question, context: Callable[[], str | None] = lambda: None, adapters=()):
    model = state.model

    def make_ids() -> list[int]:
        return model.encode(q.question, context=context())

    return state.engine.query(make_ids, q.answers[0], adapters=adapters)


def _prep_none(state):
    return Prep(0.0, 0)


def _q_none(state, q):
    return _plain(state, q)


def _prep_stuff(state):
    return Prep(0.0, len(state.doc.text.encode("utf-8")))


def _q_stuff(state, q):
    return _plain(state, q, lambda: state.doc.text)


def _prep_kv(state):
    state.prefix()
    return _with_bytes(_parts(state, "prefill"), state.kv_bytes)


def _q_kv(state, q):
    prefix = state.prefix()
    model = state.model

    def make_ids() -> list[int]:  # only the question is tokenized per query
        return prefix.ids + model.encode(q.question)[state.k :]

    return state.engine.query(make_ids, q.answers[0], prefix=prefix)


def _prep_rag(state):
    index = state.index()
    return _with_bytes(_parts(state, "index"), index.nbytes)


def _q_rag(state, q):
    index = state.index()
    return _plain(state, q, lambda: index.retrieve(q.question, state.settings.rag_k))


def _prep_d2l(state):
    adapter = state.adapter()
    return _with_bytes(_parts(state, "internalize"), adapter.nbytes)


def _q_d2l(state, q):
    return _plain(state, q, adapters=(state.adapter(),))


def _prep_hybrid(state):
    adapter, index = state.adapter(), state.index()
    return _with_bytes(_parts(state, "internalize", "index"), adapter.nbytes + index.nbytes)


def _q_hybrid(state, q):
    index = state.index()
    return _plain(state, q, lambda: index.retrieve(q.question, state.settings.rag_k), adapters=(state.adapter(),))


def _prep_distill(state):
    result = state.distilled()
    # It needs the document read once (the teacher's prefill) before any gradient step.
    return _with_bytes(_parts(state, "prefill", "distill_targets", "distill_train"), result.adapter.nbytes)


def _q_distill(state, q):
    return _plain(state, q, adapters=(state.distilled().adapter,))


def _prep_consolidated(state):
    adapter = state.consolidated()
    return _with_bytes(_parts(state, "consolidate"), adapter.nbytes)


def _q_consolidated(state, q):
    return _plain(state, q, adapters=(state.consolidated(),))


def _prep_consolidated_other(state):
    return Prep(0.0, state.other_consolidated().nbytes)  # its time is the neighbour's condition 8


def _q_consolidated_other(state, q):
    return _plain(state, q, adapters=(state.other_consolidated(),))


CONDITIONS: dict[str, Condition] = {
    c.key: c
    for c in (
        Condition("none", 1, "No document", "Base model, the question alone.", _prep_none, _q_none),
        Condition(
            "stuff",
            2,
            "Context stuffing",
            "The whole document in the prompt, prefilled again for every query.",
            _prep_stuff,
            _q_stuff,
        ),
        Condition(
            "stuff_kv",
            3,
            "Stuffing + KV reuse",
            "The document prefix is prefilled once; each query reuses its KV cache and prefills only the question.",
            _prep_kv,
            _q_kv,
        ),
        Condition(
            "rag",
            4,
            "Top-k RAG (BM25)",
            "BM25 over fixed token windows; the top-k windows, in document order, stuffed into the prompt.",
            _prep_rag,
            _q_rag,
        ),
        Condition(
            "d2l",
            5,
            "Doc-to-LoRA",
            "internalize() once; the adapter is active and the prompt holds the question alone.",
            _prep_d2l,
            _q_d2l,
        ),
        Condition(
            "d2l_rag",
            6,
            "Doc-to-LoRA + RAG",
            "The Doc-to-LoRA adapter plus the top-k BM25 windows in the prompt.",
            _prep_hybrid,
            _q_hybrid,
        ),
        Condition(
            "distill",
            7,
            "Context distillation (SGD)",
            "A LoRA trained on the document by gradient descent with the D2L objective (no test questions).",
            _prep_distill,
            _q_distill,
        ),
        Condition(
            "consolidated",
            8,
            "Consolidated adapter",
            "HyperLoRAModel.consolidate(): a rank-8 LoRA fitted to self-supervised targets from the document "
            "alone (recite, continue, cloze); the prompt holds the question alone.",
            _prep_consolidated,
            _q_consolidated,
        ),
        Condition(
            "consolidated_other",
            9,
            "Another document's consolidated adapter",
            "The control for 8: the next document's consolidated adapter (same length where the run has "
            "two), the question alone. "
            "What 8 gains over it is what the adapter knows of its own document.",
            _prep_consolidated_other,
            _q_consolidated_other,
        ),
    )
}
# Condition 3 first (its prefill is the forward-pass reference and 7's teacher), 7 right after
# it so the document's KV cache can be released before the remaining conditions run.
RUN_ORDER = ("stuff_kv", "distill", "stuff", "none", "rag", "d2l", "d2l_rag", "consolidated", "consolidated_other")
