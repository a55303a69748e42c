"""Ranking internalized documents for a query: Okapi BM25 over their source text.

Why BM25: it is a real, well-understood relevance score that needs no embedding model (nothing
to download) and favours exact entity matches, which is what questions about specific documents
mostly hinge on. Scores are unnormalised (higher is better); a retriever returns the top k.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    "a an the of to in on for and or is are was were be been by with as at from that this it its what which who whom "
    "whose when where why how do does did not no yes".split()
)


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _STOP]


class BM25Index:
    """Incremental BM25 (k1=1.5, b=0.75) over documents keyed by id. Thread-safe."""

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._tf: dict[str, Counter] = {}
        self._len: dict[str, int] = {}
        self._df: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, text: str) -> None:
        terms = Counter(tokenize(text))
        with self._lock:
            if key in self._tf:
                self._df.subtract(self._tf[key].keys())
            self._tf[key] = terms
            self._len[key] = sum(terms.values())
            self._df.update(terms.keys())

    def remove(self, key: str) -> None:
        with self._lock:
            terms = self._tf.pop(key, None)
            if terms is not None:
                self._df.subtract(terms.keys())
                del self._len[key]

    def __len__(self) -> int:
        return len(self._tf)

    def search(self, query: str, k: int = 4) -> list[tuple[str, float]]:
        q = tokenize(query)
        with self._lock:
            n = len(self._tf)
            if n == 0:
                return []
            avg = sum(self._len.values()) / n or 1.0
            scores = []
            for key, tf in self._tf.items():
                s = 0.0
                for term in q:
                    f = tf.get(term, 0)
                    if not f:
                        continue
                    idf = math.log(1 + (n - self._df[term] + 0.5) / (self._df[term] + 0.5))
                    s += idf * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * self._len[key] / avg))
                scores.append((key, s))
        scores.sort(key=lambda kv: (-kv[1], kv[0]))
        return scores[: max(0, k)]


def split_passages(text: str, size: int) -> list[str]:
    """Consecutive passages of at most ``size`` characters, cut at a line or sentence end when
    one falls in the second half (a single enormous line is cut hard, so size stays bounded)."""
    size = max(1, size)
    passages, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind("\n", start + size // 2, end), text.rfind(". ", start + size // 2, end))
            if cut > start:
                end = cut + 1
        passages.append(text[start:end])
        start = end
    return passages


def top_passages(text: str, query: str, budget_chars: int, *, passage_chars: int = 1000) -> str:
    """The passages of ``text`` that best match ``query`` (BM25), within ``budget_chars``, in
    document order. Used to stuff a long not-yet-internalized document into a bounded prompt;
    with no matching term the document's opening passages are kept."""
    passages = split_passages(text, min(passage_chars, budget_chars))
    index = BM25Index()
    for i, passage in enumerate(passages):
        index.add(str(i), passage)
    ranked = sorted(index.search(query, len(passages)), key=lambda kv: (-kv[1], int(kv[0])))
    chosen, used = [], 0
    for key, _ in ranked:
        n = len(passages[int(key)])
        if used + n > budget_chars:
            continue
        chosen.append(int(key))
        used += n
    return "\n...\n".join(passages[i].strip() for i in sorted(chosen))
