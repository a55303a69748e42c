"""Self-supervised training examples built from a document alone.

Consolidation never sees a question about the document (the evaluation's or a user's): what it
learns must come from the text. Each example is a chat turn whose answer is part of the text:

- recite: "Tell me what the document says." -> the text (long texts: segment by segment, each
  segment's prompt quoting where it starts);
- continuation: the first third of a sentence -> the rest of it;
- fact: "Tell me one fact from the document." -> one sentence;
- cloze: a sentence with a name, number or date blanked out -> the blanked words. Short answers
  about specific entities are the closest self-supervised match to what users ask.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SENTENCE_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n")
# Cloze targets: numbers (with separators/units), and runs of capitalised words not at sentence start.
_NUMBER_RE = re.compile(r"\b\d[\d,.:/]*\d\b|\b\d\b")
_NAME_RE = re.compile(r"\b([A-Z][\w'\-]*[\w](?:\s+(?:of\s+|the\s+|de\s+|van\s+)?[A-Z][\w'\-]*[\w])*)")
_ABBREVIATIONS = ("Dr.", "Mr.", "Mrs.", "Ms.", "St.", "Prof.", "Capt.", "Col.", "Gen.", "Lt.", "Sr.", "Jr.", "Mt.")
_STOP_NAMES = {"The", "A", "An", "In", "On", "At", "It", "He", "She", "They", "We", "I", "This", "That", "His", "Her"}


@dataclass(frozen=True)
class Example:
    """One training turn: ``prompt`` (a user message) answered by ``target`` (from the text)."""

    kind: str
    prompt: str
    target: str


def sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for self-supervision; no NLP dependency)."""
    parts = [" ".join(p.split()) for p in _SENTENCE_RE.split(text) if p and p.strip()]
    out: list[str] = []
    for part in parts:  # re-join splits after "Dr." and the like
        if out and out[-1].endswith(_ABBREVIATIONS):
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    return [p for p in out if len(p) > 1]


def _runs(parts: list[str], max_chars: int) -> list[str]:
    """Consecutive ``parts`` joined by spaces into runs of at most ``max_chars`` (a longer part
    stays whole)."""
    out, current = [], ""
    for part in parts:
        if current and len(current) + 1 + len(part) > max_chars:
            out.append(current)
            current = part
        else:
            current = f"{current} {part}".strip()
    return [*out, current] if current else out


def segments(text: str, max_chars: int) -> list[str]:
    """Consecutive sentence groups of at most ``max_chars`` (a longer sentence stays whole)."""
    return _runs(sentences(text), max_chars)


def segments_of_words(sentence: str, max_chars: int) -> list[str]:
    """``sentence`` as runs of whole words of at most ``max_chars`` (a longer word stays whole)."""
    return _runs(sentence.split(), max_chars)


def cloze_spans(sentence: str) -> list[str]:
    """Names and numbers in ``sentence`` worth blanking (not a sentence-initial function word)."""
    names = []
    for m in _NAME_RE.finditer(sentence):
        name = m.group(1)
        if m.start(1) == 0 and " " not in name:
            continue  # a capitalised first word is usually just the sentence start
        if name.split()[0] in _STOP_NAMES:
            name = name.split(" ", 1)[1] if " " in name else ""
        if name and name not in _STOP_NAMES:
            names.append(name)
    numbers = [m.group(0) for m in _NUMBER_RE.finditer(sentence) if not any(m.group(0) in n for n in names)]
    spans = numbers + names
    seen: set[str] = set()
    return [s for s in spans if not (s in seen or seen.add(s))]


def build_examples(text: str, *, segment_chars: int = 600) -> dict[str, list[Example]]:
    """All examples of each kind for one document (or chunk), in document order."""
    text = text.strip()
    sents = sentences(text) or [" ".join(text.split())]
    segs = segments(text, segment_chars) or [text]
    recite = []
    if len(segs) == 1:
        recite.append(Example("recite", "Tell me what the document says.", segs[0]))
    else:
        for i, seg in enumerate(segs):
            start = " ".join(seg.split()[:6])
            prompt = (
                "Tell me what the document says."
                if i == 0
                else f'Tell me what the document says, continuing from the part that starts "{start}".'
            )
            recite.append(Example("recite", prompt, seg))
    continuation, fact, cloze = [], [], []
    for sentence in sents:
        words = sentence.split()
        fact.append(Example("fact", "Tell me one fact from the document.", sentence))
        if len(words) >= 6:
            cut = max(2, len(words) // 3)
            continuation.append(
                Example(
                    "continuation",
                    f"Continue the sentence from the document: {' '.join(words[:cut])}",
                    " ".join(words[cut:]),
                )
            )
        for span in cloze_spans(sentence):
            blanked = sentence.replace(span, "____", 1)
            cloze.append(Example("cloze", f"Fill in the blank with the words from the document: {blanked}", span))
    return {"recite": recite, "continuation": continuation, "fact": fact, "cloze": cloze}


def schedule(examples: dict[str, list[Example]], weights: dict[str, float], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn by kind weight, cycling through each kind's shuffled examples.

    Cycling (rather than drawing with replacement) makes sure every sentence is seen before any
    is repeated, which matters when 30 steps x 4 sequences is about the size of the document.
    """
    rng = random.Random(seed)
    kinds = [k for k, w in weights.items() if w > 0 and examples.get(k)]
    if not kinds:
        raise ValueError("no training examples: every objective weight is 0 or the text has no sentences")
    pools = {k: [] for k in kinds}
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        if not pools[kind]:
            pools[kind] = list(examples[kind])
            rng.shuffle(pools[kind])
        out.append(pools[kind].pop())
    return out
