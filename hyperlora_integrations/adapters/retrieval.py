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
