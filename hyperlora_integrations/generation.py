"""Token-by-token decoding with transformers' sampling arguments, stop sequences and streaming.

Decoding is written by hand instead of calling ``model.generate`` for two reasons: adapters must be
active around each forward pass only (never across a ``yield``, which would leak them into the
consumer's code), and streaming must hold back text that may turn out to be the start of a stop
sequence. The *choice* of each token is transformers' own: every ``GenerationConfig`` argument
that applies to decoder-only sampling or greedy decoding is validated by ``GenerationConfig`` and
applied with transformers' logits processors and stopping criteria (``processors.py``), so code
written for ``model.generate(..., top_k=50, repetition_penalty=1.2)`` works unchanged here.

The same per-request state (``TokenPicker``) picks tokens on the one-request path below and for
each row of a batch in ``batching.py``, which is what makes batched and solo decoding agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .processors import SamplingParams, build_logits_processors, build_stopping_criteria

__all__ = ["Chunk", "SamplingParams", "TextAssembler", "TokenPicker", "chunks_from_tokens", "stream_tokens"]


@dataclass
class Chunk:
    """A piece of generated text; the last one of a stream has ``finish_reason`` set.

    ``token_ids`` (on the last chunk only) are the completion's token ids, without the EOS token:
    what tests compare to prove that batched and solo decoding chose the same tokens.
    """

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()


class TokenPicker:
    """One request's token choice: its logits processors, stopping criteria, RNG and ids so far.

    Processors and criteria are built per request (some keep state, e.g. a grammar's position),
    and see exactly the ids ``model.generate`` would show them: the prompt plus the completion.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], eos_ids: set[int], vocab_size: int) -> None:
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.max_new_tokens = params.new_tokens_for(self.prompt_len)
        self.eos_ids = set(params.eos_token_ids) if params.eos_token_ids is not None else set(eos_ids)
        self.ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        self.processors = build_logits_processors(params, self.ids, self.eos_ids, vocab_size, self.max_new_tokens)
        self.criteria = build_stopping_criteria(params)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.completion: list[int] = []

    def pick(self, logits: torch.Tensor) -> tuple[int | None, str | None]:
        """Choose the next token from one row of next-token logits ``(vocab,)``.

        Returns the token and a finish reason (``None`` to go on). EOS is returned as
        ``(None, "stop")``: it ends the request and is not part of the completion.
        """
        scores = logits.detach().to(device="cpu", dtype=torch.float32).reshape(1, -1)
        if self.processors:
            scores = self.processors(self.ids, scores.clone())
        if self.params.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs[0], 1, generator=self.generator))
        else:
            token = int(scores[0].argmax())
        if token in self.eos_ids:
            return None, "stop"
        self.completion.append(token)
        self.ids = torch.cat([self.ids, torch.tensor([[token]])], dim=1)
        if self.criteria and bool(self.criteria(self.ids, scores).any()):
            return token, "stop"
        if len(self.completion) >= self.max_new_tokens:
            return token, "length"
        return token, None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop sequence."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class TextAssembler:
    """Turns completion token ids into final text pieces, holding back possible stop prefixes.

    Decoding the whole completion each time (not token by token) keeps multi-byte characters
    and tokenizer spacing right; text that might still become a stop sequence, or an incomplete
    UTF-8 character, is emitted only once it is certain.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def _stop_at(self, text: str) -> int:
        return min((text.find(s) for s in self.stops if s in text), default=-1)

    def push(self, token: int) -> str:
        """Add a token; return the text that became final (``stopped`` says a stop string hit)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._stop_at(text)
        if hit >= 0:
            self.stopped = True
            piece = text[self.emitted : hit] if hit > self.emitted else ""
            self.emitted = max(self.emitted, hit)
            return piece
        safe = len(text) - _held_back(text, self.stops)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe > self.emitted:
            piece, self.emitted = text[self.emitted : safe], safe
            return piece
        return ""

    def flush(self) -> str:
        """What was held back (a stop-sequence prefix that never completed)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._stop_at(text)
        end = hit if hit >= 0 else len(text)
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def chunks_from_tokens(
    tokens: Iterator[tuple[int | None, str | None]],
    tokenizer: PreTrainedTokenizerBase,
    stops: Sequence[str],
    prompt_tokens: int,
) -> Iterator[Chunk]:
    """Chunks from a stream of ``(token, finish_reason)``, shared by the solo and batched paths.

    A stop string ends the stream early: ``tokens`` is closed, which for a batched request frees
    its row in the batch.
    """
    text = TextAssembler(tokenizer, stops)
    finish = "length"
    completion: list[int] = []
    try:
        for token, reason in tokens:
            if token is not None:  # None: the model chose EOS
                completion.append(token)
                piece = text.push(token)
                if piece:
                    yield Chunk(piece)
                if text.stopped:
                    finish = "stop"
                    break
            if reason is not None:
                finish = reason
                break
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    rest = text.flush()
    if rest:
        yield Chunk(rest)
    yield Chunk(
        "",
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(completion),
        token_ids=tuple(completion),
    )


def last_logits_only(model: PreTrainedModel) -> dict:
    """``logits_to_keep=1`` where the model takes it (as ``generate()`` does): a prefill then
    projects only its last position onto the vocabulary instead of every prompt position.
    Both decoding paths use it, so their prefill logits are computed the same way."""
    import inspect

    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


class _SoloTokens:
    """``(token, finish_reason)`` pairs of one request decoded alone, one forward pass per token."""

    def __init__(
        self,
        model: PreTrainedModel,
        picker: TokenPicker,
        prompt_ids: list[int],
        scope: Callable[[], AbstractContextManager],
    ) -> None:
        self._it = self._run(model, picker, prompt_ids, scope)

    @staticmethod
    def _run(model, picker, prompt_ids, scope):
        device = next(model.parameters()).device
        past = None
        step_input = torch.tensor([prompt_ids], device=device)
        extra = last_logits_only(model)
        while True:
            with torch.no_grad(), scope():
                out = model(input_ids=step_input, cache=past, use_cache=True, **extra)
            past = out.cache
            token, finish = picker.pick(out.logits[0, -1])
            yield token, finish
            if finish is not None:
                return
            step_input = torch.tensor([[token]], device=device)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int | None, str | None]:
        return next(self._it)

    def close(self) -> None:
        self._it.close()


def stream_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    params: SamplingParams,
    scope: Callable[[], AbstractContextManager],
    eos_ids: set[int],
) -> Iterator[Chunk]:
    """Yield text chunks as they become final; ``scope()`` wraps each forward pass."""
    picker = TokenPicker(params, prompt_ids, eos_ids, int(model.config.get_text_config().vocab_size))
    tokens = _SoloTokens(model, picker, prompt_ids, scope)
    yield from chunks_from_tokens(tokens, tokenizer, params.stop, len(prompt_ids))
