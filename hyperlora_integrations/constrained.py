"""Grammar-constrained decoding: JSON schemas, regexes and tool calls the model cannot get wrong.

A small model asked for JSON in the system prompt often answers in prose, drops a required key or
runs out of tokens mid-string. Here every decoding step is masked to the tokens a grammar still
allows, so the text that comes out parses and validates by construction. The grammar engine is
llguidance (MIT, a 3 MB wheel with no dependencies; ``docs/benchmarks.md`` has the measurement
against xgrammar, which needs triton on Linux). It compiles JSON schemas, regexes and Lark
grammars, and computes a token mask in well under a millisecond on CPU.

``GrammarLogitsProcessor`` is a plain transformers ``LogitsProcessor``: it works in our own decoder
(``logits_processor=`` per call), in ``model.generate`` and with adapters active (it only sees
logits). It keeps one matcher per batch row, so a batch may mix constrained and free requests.

Two things beyond masking make the guarantee hold in practice:

* undeclared object keys are not generated (``additionalProperties: false`` is added where a
  schema leaves it open), so an object has exactly the keys its schema names;
* the token budget is respected: when the tokens left are about what closing the current value
  takes, the processor steers to the shortest way out (close the string, emit the required keys,
  close the brackets), so ``max_new_tokens`` ends on valid JSON rather than mid-value.

What the grammar is (JSON schema, regex or tool calls as Lark text) is decided in ``_grammars.py``;
this module compiles it and masks the logits. Every name is importable from here.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from ._grammars import (
    JSON_OPTIONS,
    Grammar,
    build_grammar,
    json_object_grammar,
    json_schema_grammar,
    regex_grammar,
    schema_dict,
    tool_call_grammar,
    tool_specs,
)
from .errors import HyperLoRAError, InvalidInputError, MissingDependencyError

__all__ = [
    "Grammar",
    "GrammarCache",
    "GrammarLogitsProcessor",
    "GrammarViolationError",
    "JSON_OPTIONS",
    "build_grammar",
    "constraint_processor",
    "grammar_cache",
    "json_object_grammar",
    "json_schema_grammar",
    "regex_grammar",
    "schema_dict",
    "tool_call_grammar",
    "tool_specs",
]

# Short texts that close or fill a JSON value: candidates when the budget is low (single tokens only).
_CLOSERS = (
    '"',
    ' "',
    "}",
    "]",
    '"}',
    '"]',
    "}]",
    "}}",
    "]}",
    '"}]',
    '"}}',
    "0",
    " 0",
    '""',
    ' ""',
    "{}",
    " {}",
    "[]",
    " []",
    "null",
    " null",
    "true",
    " true",
    "}]</",
    '"}]</',
    "</",
)
_CACHE_SIZE = 64
_START = (False, False, 0)  # JSON scan state: inside a string, after a backslash, bracket depth


def _scan(state: tuple[bool, bool, int], text: str) -> tuple[bool, bool, int]:
    """Advance a JSON scan over ``text``: enough to tell how much is left open."""
    in_string, escaped, depth = state
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_string, escaped, depth


def _rank(state: tuple[bool, bool, int], text: str) -> tuple[int, int, int]:
    """Closer is better: out of strings first, then fewer open brackets, then shorter text."""
    return int(state[0] or state[1]), state[2], len(text)


class GrammarViolationError(HyperLoRAError):
    """A token outside the grammar reached a constrained request (a processor after ours or a
    caller that edited the ids added it): the output can no longer be guaranteed to match."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:  # a core dependency; only a broken install lacks it
        raise MissingDependencyError("constrained decoding needs llguidance: pip install 'llguidance>=1.9'") from None
    return llguidance


# ---------------------------------------------------------------------- compilation cache
class GrammarCache:
    """One tokenizer's llguidance view (built once, ~1 s) and its compiled grammars (LRU).

    A compiled grammar is kept as a prototype matcher; each request gets a ``deep_copy`` of it,
    which costs microseconds where compiling a tool-call grammar costs milliseconds.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int]) -> None:
        llg = _llguidance()
        self.eos_ids = sorted({int(e) for e in eos_ids})
        if not self.eos_ids:
            raise InvalidInputError("constrained decoding needs the model's EOS token id(s)")
        self.vocab_size = len(tokenizer)
        try:
            self.ll_tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids)
        except ValueError as exc:
            raise InvalidInputError(f"constrained decoding needs a fast (Rust) tokenizer: {exc}") from None
        self._prototypes: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        closers = []
        for text in _CLOSERS:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in closers:
                closers.append(ids[0])
        self.closer_ids = torch.tensor(closers, dtype=torch.long)
        self._texts: dict[int, str] = {}
        self._by_length: torch.Tensor | None = None

    def text(self, token: int) -> str:
        """The text of one token (bytes of a split character are dropped: only ASCII matters here)."""
        text = self._texts.get(token)
        if text is None:
            text = self.ll_tokenizer.decode_bytes([token]).decode("utf-8", errors="ignore")
            self._texts[token] = text
        return text

    def shortest_allowed(self, allowed: torch.Tensor) -> int | None:
        """The allowed non-special token with the shortest text (``None`` if there is none).

        Token ids are kept sorted by length once; the first few hundred (single characters
        and the like) settle nearly every state without touching the whole vocabulary.
        """
        if self._by_length is None:
            lengths = [
                (len(self.ll_tokenizer.decode_bytes([t])), t)
                for t in range(self.vocab_size)
                if not self.ll_tokenizer.is_special_token(t)
            ]
            self._by_length = torch.tensor([t for _, t in sorted(lengths)], dtype=torch.long)
        for chunk in (self._by_length[:512], self._by_length):
            hits = allowed[chunk].nonzero()
            if len(hits):
                return int(chunk[hits[0, 0]])
        return None

    def matcher(self, grammar: Grammar):
        """A fresh matcher at the start of ``grammar``; ``InvalidInputError`` if it does not compile."""
        llg = _llguidance()
        with self._lock:
            proto = self._prototypes.get(grammar.lark)
            if proto is not None:
                self._prototypes.move_to_end(grammar.lark)
                return proto.deep_copy()
        proto = llg.LLMatcher(self.ll_tokenizer, llg.LLMatcher.grammar_from_lark(grammar.lark), log_level=0)
        if proto.is_error():
            first = proto.get_error().strip().splitlines()[0][:400]
            raise InvalidInputError(f"cannot constrain decoding to {grammar.describe}: {first}")
        with self._lock:
            self._prototypes[grammar.lark] = proto
            while len(self._prototypes) > _CACHE_SIZE:
                self._prototypes.popitem(last=False)
            return proto.deep_copy()


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def grammar_cache(tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int]) -> GrammarCache:
    """The shared ``GrammarCache`` of ``tokenizer`` with these EOS ids."""
    key = tuple(sorted({int(e) for e in eos_ids}))
    with _CACHES_LOCK:
        per_tokenizer = _CACHES.setdefault(tokenizer, {})
        cache = per_tokenizer.get(key)
    if cache is None:
        cache = GrammarCache(tokenizer, key)
        with _CACHES_LOCK:
            cache = per_tokenizer.setdefault(key, cache)
    return cache


# ---------------------------------------------------------------------- the logits processor
class GrammarLogitsProcessor(LogitsProcessor):
    """Masks each row's next-token scores to what ``grammar`` allows after that row's output.

    Rows are matched independently (a matcher per row, created at the first call, when the ids
    are the prompt). ``max_new_tokens`` turns on budget-aware closing: with fewer tokens left than
    closing takes plus ``margin``, only the next token of the shortest way out is allowed.
    Instances keep state: use a fresh one per request.
    """

    def __init__(
        self, cache: GrammarCache, grammar: Grammar, *, max_new_tokens: int | None = None, margin: int = 6
    ) -> None:
        self.cache = cache
        self.grammar = grammar
        self.max_new_tokens = max_new_tokens
        self.margin = margin
        self._matchers: list[Any] = []
        self._seen: list[int] = []
        self._prompt_len = 0
        self._closing_need: list[int | None] = []
        self._states: list[tuple[bool, bool, int]] = []
        self._probed: list[tuple[bool, bool, int] | None] = []
        self.forced_steps = 0  # how many tokens budget-aware closing chose (for tests and benchmarks)
        cache.matcher(grammar)  # compile now: a bad schema fails at call time, not mid-stream
        width = (cache.vocab_size + 31) // 32
        self._mask = torch.zeros(width, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32)

    def set_budget(self, max_new_tokens: int) -> None:
        """Turn on budget-aware closing; refuse a budget below the shortest valid output.

        Checked before generating, so a ``max_new_tokens`` that cannot hold even the shortest
        output of the grammar (a forced tool call is ~25 tokens) fails with a clear message
        instead of returning a cut-off call.
        """
        path = self._closing_path(self.cache.matcher(self.grammar), _START, max_new_tokens + 64)
        if path is not None and len(path) > max_new_tokens:
            raise InvalidInputError(
                f"max_new_tokens={max_new_tokens} is too small for {self.grammar.describe}: its shortest valid "
                f"output takes {len(path)} tokens; raise max_new_tokens (max_tokens in LangChain/LlamaIndex)"
            )
        self.max_new_tokens = max_new_tokens

    # -- state
    def _sync(self, input_ids: torch.Tensor) -> None:
        rows, length = input_ids.shape
        if not self._matchers:
            self._matchers = [self.cache.matcher(self.grammar) for _ in range(rows)]
            self._seen = [length] * rows
            self._closing_need = [None] * rows
            self._states = [_START] * rows
            self._probed = [None] * rows
            self._prompt_len = length
            return
        if rows != len(self._matchers):
            raise InvalidInputError(
                f"this processor was started on {len(self._matchers)} rows and now sees {rows}: "
                "use a fresh GrammarLogitsProcessor per request"
            )
        for row, matcher in enumerate(self._matchers):
            new = input_ids[row, self._seen[row] :].tolist()
            self._seen[row] = length
            if matcher.is_stopped():  # finished rows of a batch are fed padding: nothing to match
                continue
            for token in new:
                if not matcher.consume_token(int(token)):
                    raise GrammarViolationError(
                        f"token {token} is outside {self.grammar.describe}; a processor that runs after "
                        "the grammar (or edited ids) chose it"
                    )
                self._states[row] = _scan(self._states[row], self.cache.text(int(token)))

    def _allowed(self, matcher) -> torch.Tensor:
        """Boolean mask over the tokenizer's vocabulary."""
        matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask.numel() * 4)
        bits = (self._mask.unsqueeze(-1) >> self._bits) & 1
        return bits.view(-1)[: self.cache.vocab_size].bool()

    # -- budget-aware closing
    def _closing_path(self, matcher, state: tuple[bool, bool, int], limit: int) -> list[int] | None:
        """Tokens of a short completion of ``matcher`` (at most ``limit``), or None if none found.

        Greedy: forced tokens as they come; otherwise, of the allowed closers and the shortest
        allowed token, the one that leaves the fewest open strings and brackets.
        """
        probe = matcher.deep_copy()
        path: list[int] = []
        while not probe.is_accepting():
            if len(path) >= limit:
                return None
            step = probe.compute_ff_tokens()
            if not step:
                allowed = self._allowed(probe)
                closers = self.cache.closer_ids
                candidates = closers[allowed[closers]].tolist()
                shortest = self.cache.shortest_allowed(allowed)
                if shortest is not None:
                    candidates.append(shortest)
                if not candidates:
                    return None
                step = [min(candidates, key=lambda t: _rank(_scan(state, self.cache.text(t)), self.cache.text(t)))]
            for token in step:
                if not probe.consume_token(int(token)):
                    return None
                state = _scan(state, self.cache.text(int(token)))
            path += step
        return path if len(path) <= limit else None

    def _tail(self, row: int, matcher, generated: int, scores: torch.Tensor, allowed: torch.Tensor) -> list[int] | None:
        """The tokens allowed near the end of the budget (``None``: no restriction).

        Far from the end the closing distance is refreshed every few tokens. Within
        ``4 * margin`` tokens of it, the best-scoring allowed tokens are kept only if the
        output can still be closed in the tokens left after them; if none can, the next token
        of the shortest way out is forced.
        """
        if self.max_new_tokens is None:
            return None
        left = self.max_new_tokens - generated  # tokens still to be chosen, this one included
        need = self._closing_need[row]
        state = self._states[row]
        if need is None or left > need + 4 * self.margin:
            # Far from the end. The distance to closing changes with the structure (a new object,
            # a required key written), so it is re-measured when the scan state moves and now and
            # then; inside a long string nothing is probed.
            if need is not None and state == self._probed[row] and generated % 16:
                return None
            path = self._closing_path(matcher, state, left + 4 * self.margin)
            self._closing_need[row] = need = len(path) if path is not None else None
            self._probed[row] = state
            if need is not None and left > need + 4 * self.margin:
                return None
        if matcher.is_accepting() and int(allowed.sum()) > 0.9 * self.cache.vocab_size:
            return None  # free text: every token keeps the output valid
        # Near the end: the best-scoring allowed token that still leaves a way to close in time
        # (decoding is greedy here; a sampled token could not be checked before it is drawn).
        ranked = scores.masked_fill(~allowed, float("-inf")).topk(min(8, int(allowed.sum()))).indices.tolist()
        for token in ranked:
            if token in self.cache.eos_ids:
                if matcher.is_accepting():
                    return [token]
                continue
            after = _scan(state, self.cache.text(token))
            if state[0] and after == state and need is not None and need <= left - 1:
                return [token]  # more text inside a string: closing it takes what it took before
            probe = matcher.deep_copy()
            if not probe.consume_token(token):
                continue
            path = self._closing_path(probe, after, left - 1)
            if path is not None:
                self._closing_need[row] = len(path)
                return [token]
        if matcher.is_accepting():
            return [self.cache.eos_ids[0]]
        path = self._closing_path(matcher, state, left + 4 * self.margin)
        return path[:1] if path else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._sync(input_ids)
        generated = input_ids.shape[1] - self._prompt_len
        vocab = self.cache.vocab_size
        out = scores.clone()
        for row, matcher in enumerate(self._matchers):
            if matcher.is_error():
                raise GrammarViolationError(f"the matcher for {self.grammar.describe} failed: {matcher.get_error()}")
            allowed = self._allowed(matcher)
            if out.shape[1] > vocab:  # padded embedding rows are never real tokens
                out[row, vocab:] = float("-inf")
            tail = self._tail(row, matcher, generated, out[row, :vocab], allowed)
            if tail is not None:
                self.forced_steps += 1
                allowed = torch.zeros_like(allowed)
                allowed[tail] = True
            out[row, :vocab].masked_fill_(~allowed, float("-inf"))
        return out


def constraint_processor(
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: Iterable[int],
    *,
    json_schema: Any = None,
    regex: str | None = None,
    tools: Sequence[Any] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = True,
    max_new_tokens: int | None = None,
) -> GrammarLogitsProcessor | None:
    """The processor for these call options, or ``None`` when none of them is given."""
    grammar = build_grammar(
        json_schema=json_schema,
        regex=regex,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
    )
    if grammar is None:
        return None
    return GrammarLogitsProcessor(grammar_cache(tokenizer, eos_ids), grammar, max_new_tokens=max_new_tokens)
