"""What one consolidation job of a conversation memory learns: new turns, a replay, their text.

Each job learns the oldest turns that left the recent window and are not in the adapter yet
(up to ``job_tokens``), plus a capped, seeded sample of turns earlier jobs learned
(``replay_tokens``), warm-started from the adapter those jobs left. Why the replay: a job fits its
own text for a few dozen steps; without seeing old turns again it drifts away from them (the
measurement is in docs/memory.md, "Replay").

Adapters are named ``mem-<seq>``, ``<seq>`` being the last turn they hold, so the adapter id
*is* the memory's watermark: committed in the same store transaction that finishes the job,
it can never disagree with what the adapter learned (a killed job leaves the previous adapter
and watermark, a finished one the new pair).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .turns import Turn, TurnLog

PREFIX = "mem-"
_ID_RE = re.compile(r"mem-([0-9]{1,18})")
LABELS = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}


def adapter_id(through: int) -> str:
    return f"{PREFIX}{through}"


def through_of(adapter_id: str) -> int | None:
    """The last turn a memory adapter holds, read from its id (None: not a memory adapter)."""
    match = _ID_RE.fullmatch(adapter_id)
    return int(match.group(1)) if match else None


def render(turns: Sequence[Turn]) -> str:
    """A transcript: one paragraph per turn, ``Speaker: text``.

    Blank lines keep turns apart for the consolidation targets (their sentence splitter breaks
    on them), so a fact is never glued to the neighbouring turn's words.
    """
    parts = []
    for turn in turns:
        text = " ".join(turn.content.split())
        if text:
            parts.append(f"{LABELS.get(turn.role, turn.role.title())}: {text}")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class JobPlan:
    """The next job of one namespace: which turns it learns and the text it learns them from."""

    through: int
    new: tuple[int, ...]
    replay: tuple[int, ...]
    text: str

    @property
    def adapter_id(self) -> str:
        return adapter_id(self.through)


def plan(
    log: TurnLog,
    namespace: str,
    *,
    watermark: int,
    window_start: int,
    job_tokens: int,
    replay_tokens: int,
    seed: int,
    min_tokens: int = 1,
) -> JobPlan | None:
    """The next job, or None when fewer than ``min_tokens`` tokens of turns before the window
    wait to be learned (every one of them, with the default).

    New turns are taken oldest first while they fit in ``job_tokens`` (always at least one, so
    one long turn still moves the watermark). A batch whose turns are all empty still makes a
    job: the text then holds only the replay, or a placeholder, and the watermark moves past it.
    """
    candidates = [(seq, tokens) for seq, _, tokens in log.sizes(namespace, through=window_start - 1) if seq > watermark]
    if not candidates or sum(tokens for _, tokens in candidates) < min_tokens:
        return None
    batch, used = [], 0
    for seq, tokens in candidates:
        if batch and used + tokens > job_tokens:
            break
        batch.append(seq)
        used += tokens
    replay: list[int] = []
    if replay_tokens > 0 and watermark > 0:
        old = log.sizes(namespace, through=watermark)
        rng = random.Random(seed * 1_000_003 + batch[-1])
        rng.shuffle(old)
        budget = replay_tokens
        for seq, _, tokens in old:
            if tokens <= budget:
                replay.append(seq)
                budget -= tokens
    turns = log.select(namespace, sorted(replay) + batch)  # chronological: the replay is older
    text = render(turns) or "(nothing was said)"
    return JobPlan(through=batch[-1], new=tuple(batch), replay=tuple(sorted(replay)), text=text)
