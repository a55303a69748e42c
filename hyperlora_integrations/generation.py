"""Token-by-token decoding with stop sequences, sampling and streaming.

Written by hand instead of ``model.generate`` for two reasons: adapters must be active around
each forward pass only (never across a ``yield``, which would leak them into the consumer's
code), and streaming must hold back text that may turn out to be the start of a stop sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import InvalidInputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.max_new_tokens > 1_000_000:
            raise InvalidInputError(f"max_new_tokens={self.max_new_tokens} is absurdly large")
        for name in ("temperature", "top_p"):  # NaN would pass the range checks and poison sampling
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise InvalidInputError("temperature must be >= 0 and top_p in (0, 1]")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63
        ):
            raise InvalidInputError(f"seed must be a non-negative int, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else (self.stop or ())  # "END" is one stop, not 3
        try:
            stop = tuple(stop)
        except TypeError:
            raise InvalidInputError(f"stop must be a string or a list of strings, got {self.stop!r}") from None
        if not all(isinstance(s, str) for s in stop):
            raise InvalidInputError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = tuple(s for s in stop if s)


@dataclass
class Chunk:
    """A piece of generated text; the last one of a stream has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop sequence."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    params: SamplingParams,
    scope: Callable[[], AbstractContextManager],
    eos_ids: set[int],
) -> Iterator[Chunk]:
    """Yield text chunks as they become final; ``scope()`` wraps each forward pass."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    ids: list[int] = []
    emitted = 0
    past = None
    step_input = torch.tensor([prompt_ids], device=device)
    finish = "length"
    for _ in range(params.max_new_tokens):
        with torch.no_grad(), scope():
            out = model(input_ids=step_input, cache=past, use_cache=True)
        past = out.cache
        token = _pick(out.logits[0, -1], params, generator)
        if token in eos_ids:
            finish = "stop"
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        hit = min((text.find(s) for s in params.stop if s in text), default=-1)
        if hit >= 0:
            if hit > emitted:
                yield Chunk(text[emitted:hit])
            emitted = hit
            finish = "stop"
            break
        safe = len(text) - _held_back(text, params.stop)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield Chunk(text[emitted:safe])
            emitted = safe
        step_input = torch.tensor([[token]], device=device)
    # Flush what was held back (a partial stop-sequence prefix that never completed).
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hit = min((text.find(s) for s in params.stop if s in text), default=-1)
    end = hit if hit >= 0 else len(text)
    if end > emitted:
        yield Chunk(text[emitted:end])
    yield Chunk("", finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=len(ids))
