"""Answer quality and the statistics around it: token-F1, exact match, gap closure, bootstrap CIs.

F1 and EM follow the SQuAD evaluation script (lower-case, strip punctuation and articles, best
over the gold answers) so the numbers mean what readers of reading-comprehension papers expect.
Intervals are percentile bootstraps over questions: the benchmark has tens of questions per
length, not thousands, and a bare mean would hide how little that pins down.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 of ``prediction`` against any gold answer."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if ``prediction`` equals any gold answer after normalisation."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


def gap_closure(nll_none: float, nll_context: float, nll_condition: float) -> float | None:
    """Share of the no-document -> document-in-prompt NLL gap a condition closes.

    1.0 means as good as reading the document in the prompt, 0.0 no better than no document.
    Undefined (None) when stuffing does not help at all, rather than dividing by ~0.
    """
    gap = nll_none - nll_context
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        return None
    return (nll_none - nll_condition) / gap


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def bootstrap(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., float | None],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | None]:
    """Point estimate and percentile interval of ``statistic(*columns)`` over resampled rows.

    The columns are paired (row ``i`` of each is the same question), and rows are resampled
    jointly, so ratios and gap closures keep the pairing that makes them meaningful.
    Resamples where the statistic is undefined are dropped; too few defined -> no interval.
    """
    n = len(columns[0]) if columns else 0
    if n == 0 or any(len(c) != n for c in columns):
        return {"mean": None, "lo": None, "hi": None, "n": n}
    point = statistic(*columns)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        value = statistic(*([c[i] for i in idx] for c in columns))
        if value is not None and math.isfinite(value):
            stats.append(value)
    if point is None or len(stats) < resamples // 2:
        return {"mean": point, "lo": None, "hi": None, "n": n}
    stats.sort()
    tail = (1 - level) / 2
    lo = stats[min(len(stats) - 1, int(tail * len(stats)))]
    hi = stats[min(len(stats) - 1, int((1 - tail) * len(stats)))]
    return {"mean": point, "lo": lo, "hi": hi, "n": n}


def ratio_of_means(num: Sequence[float], den: Sequence[float]) -> float | None:
    """``mean(num) / mean(den)``; None when the denominator is zero (e.g. both F1s are 0)."""
    d = mean(den)
    if d is None or abs(d) < 1e-12:
        return None
    return mean(num) / d
