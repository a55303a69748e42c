"""Training targets for consolidating a *skill*: what the model does with the description in view.

A document is consolidated on targets cut from its own text. A skill has no text to cut: what
it should do is only known by running the model with the description in its prompt (the
teacher) on inputs the task plausibly takes. So a skill's targets are built in three steps:

1. inputs: small generic pools read from data already on the machine (common English words from
   the base model's own vocabulary, numbers, country and city names from the ``tzdata`` package
   or the system's zoneinfo), plus inputs the model itself writes when shown the description.
   Nothing is downloaded; the pools do not know which task they serve.
2. the teacher's answer to each input (greedy, ending with EOS so the student learns to stop);
3. the teacher's *distribution* at every answer position (its top-k next-token probabilities),
   which the student matches. Matching only the greedy tokens made skills over-confident (gold
   NLL 5.83 against 3.88 for the description in the prompt, in the trial reported in issue 22).

Few-shot examples become targets too: one-hot rows on the gold output (plain cross-entropy).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..chat import encode_text

if TYPE_CHECKING:
    from ..lora import Adapter
    from ..model import HyperLoRAModel

POOLS = ("words", "numbers", "countries", "cities")
# The inputs before ``ranked_inputs`` (2026-12-02): drawn at random, the same mix for every task.
RANDOM_MIX = {"words": 16, "numbers": 8, "countries": 8, "cities": 8}
_WORD_RE = re.compile(r"^[a-z]{4,12}$")
# The teacher's answer format: two demonstrations of terse answers (from the dev tasks of
# bench/fixtures/heldout_skills.json, never the held-out ones), then the task, its input and a
# prefilled "Output:". Told the description alone, the 135M model talks around the answer
# ('The past tense of the English verb "go" is "'); in this frame it answers (dev tasks: exact
# match 19/36 against 0/36 for the description in the prompt).
FORMAT_DEMOS = (
    ("Give the past tense of the English verb.", "eat", "ate"),
    ("Give the female form of the word.", "king", "queen"),
)
_WRITE_PROMPT = (
    "Here is a task: {description}\n"
    "Write one new example of an input this task could be given. Reply with the input only."
)


@dataclass
class SoftSequence:
    """One training row: ``target`` follows ``prompt``; per target position the top-k ids and
    their probabilities (rows sum to 1). A gold example has a single id of probability 1."""

    prompt: list[int]
    target: list[int]
    top_ids: torch.Tensor  # (len(target), k) long
    top_probs: torch.Tensor  # (len(target), k) float
    weight: float = 1.0


# ---------------------------------------------------------------------- input pools
@lru_cache(maxsize=4)
def vocab_words(tokenizer, limit: int = 4000) -> tuple[str, ...]:
    """Common lower-case English words: whole-word tokens of the tokenizer, earliest merges first.

    A byte-level BPE merges frequent words first, so low ids are frequent words; a word must
    decode from a single space-prefixed token (``"Ġhouse"``), which also skips most fragments.
    """
    vocab = tokenizer.get_vocab()
    words = []
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token.startswith("Ġ") and _WORD_RE.match(token[1:]):
            words.append((token[1:], idx))
        if len(words) >= limit:
            break
    return tuple(w for w, _ in words)


def _zoneinfo_file(name: str) -> Path | None:
    try:
        import importlib.resources

        path = Path(str(importlib.resources.files("tzdata") / "zoneinfo" / name))
        if path.is_file():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    system = Path("/usr/share/zoneinfo") / name
    return system if system.is_file() else None


@lru_cache(maxsize=1)
def countries() -> tuple[str, ...]:
    """Country names from the IANA time zone data (``iso3166.tab``); empty where it is absent."""
    path = _zoneinfo_file("iso3166.tab")
    if path is None:
        return ()
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and "\t" in line:
            name = line.split("\t", 1)[1].strip()
            if name.isascii() and "&" not in name and "(" not in name and len(name) <= 20:
                names.append(name)
    return tuple(names)


@lru_cache(maxsize=1)
def cities() -> tuple[str, ...]:
    """City names of the IANA time zones (``Europe/Paris`` -> ``Paris``)."""
    path = _zoneinfo_file("zone1970.tab")
    if path is None:
        return ()
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            zone = line.split("\t")[2]
            city = zone.rsplit("/", 1)[-1].replace("_", " ")
            if city.isascii() and city[:1].isupper():
                names.add(city)
    return tuple(sorted(names))


_POOL_SOURCES = {
    "words": lambda model: vocab_words(model.tokenizer),
    "numbers": lambda model: tuple(str(n) for n in range(1000)),
    "countries": lambda model: countries(),
    "cities": lambda model: cities(),
}


def _pool_items(model: HyperLoRAModel, pool: str, banned: set[str]) -> list[str]:
    """A pool's items, less those whose lower-cased form is ``banned``."""
    return [x for x in _POOL_SOURCES[pool](model) if x.lower() not in banned]


def pool_inputs(model: HyperLoRAModel, counts: dict[str, int], seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """``counts[pool]`` inputs drawn from each generic pool (skipping ``exclude``, e.g. the
    questions an evaluation will ask, so a measurement is on inputs never trained on)."""
    rng = random.Random(f"skill-pools:{seed}")
    banned = {x.strip().lower() for x in exclude}
    out: list[str] = []
    for pool, n in counts.items():
        if n <= 0:
            continue
        candidates = _pool_items(model, pool, banned)
        out += rng.sample(candidates, min(n, len(candidates)))
    return out


def _demo_frame(demos: Sequence[tuple[str, str, str]]) -> str:
    """The demonstrations the teacher's prompt (and the input ranking) starts with."""
    return "\n".join(f"Task: {d}\nInput: {x}\nOutput: {y}\n" for d, x, y in demos)


def _frame_ids(model: HyperLoRAModel, description: str) -> tuple[list[int], int]:
    """The teacher's frame up to ``Input:`` as the chat template lays it out, and the token
    that ends the user turn (what follows a candidate input)."""
    tok = model.tokenizer
    text = f"{_demo_frame(FORMAT_DEMOS)}\nTask: {description}\nInput:"
    full = model.encode(text + "\x00")
    head = encode_text(tok, text)
    start = next(i for i in range(len(full)) if full[i : i + len(head)] == head) + len(head)
    special = set(tok.all_special_ids)
    return full[:start], next(t for t in full[start:] if t in special)


def input_logprobs(
    model: HyperLoRAModel, description: str, candidates: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """How likely the model finds each candidate as the task's input, in the teacher's frame.

    Returns ``log p(candidate, end of the user turn | frame up to "Input:")`` per candidate
    and the frame's next-token log-probabilities (which rank any item by its first token for
    free). The frame runs once; the candidates run as one batch after its repeated KV cache,
    right-padded (``tests/test_skill_consolidation.py`` checks it against whole prompts)."""
    prefix, end = _frame_ids(model, description)
    tok = model.tokenizer
    device = model.base.device
    rows = [encode_text(tok, f" {x}") + [end] for x in candidates]
    width = max((len(r) for r in rows), default=1)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        first = model.model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        head = torch.log_softmax(first.logits[0, -1].float(), dim=-1).cpu()
        if not rows:
            return torch.zeros(0), head
        cache = first.cache
        cache.batch_repeat_interleave(len(rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * (len(prefix) + len(r)) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model.model(input_ids=ids, attention_mask=mask, cache=cache).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
    valid = torch.arange(width - 1)[None, :] < torch.tensor([len(r) - 1 for r in rows])[:, None]
    return head[ids[:, 0].cpu()] + (logp * valid).sum(-1), head


def _shares(log_mass: dict[str, float], n: int) -> dict[str, int]:
    """``n`` split in proportion to ``exp(log_mass)``, rounding by largest remainder."""
    keys = list(log_mass)
    exact = (torch.softmax(torch.tensor([log_mass[k] for k in keys]), 0) * n).tolist()
    counts = {k: int(x) for k, x in zip(keys, exact, strict=True)}
    for k, _ in sorted(zip(keys, exact, strict=True), key=lambda kx: -(kx[1] % 1))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


@lru_cache(maxsize=16)
def _first_tokens(tokenizer, items: tuple[str, ...]) -> dict[str, int]:
    """Each item of a whole pool -> its first token as it follows ``"Input:"`` (one batched
    tokenizer call per pool, cached: the exclusions differ per task, the pool does not; pool
    items hold no control tokens, so the split-special-tokens flag ``encode_text`` guards is moot)."""
    encoded = tokenizer([f" {x}" for x in items], add_special_tokens=False)["input_ids"]
    return {x: ids[0] for x, ids in zip(items, encoded, strict=True)}


def ranked_inputs(
    model: HyperLoRAModel,
    description: str,
    n: int,
    seed: int,
    exclude: Iterable[str] = (),
    pools: Sequence[str] = POOLS,
    sample: int = 24,
) -> list[str]:
    """``n`` pool inputs, shared out between the pools by how likely the model finds each pool's
    items as *this task's* input.

    Generic pools serve a task only by chance (a past-tense skill learnt from 16 random words, 8
    numbers, 8 countries and 8 cities); the model knows which inputs a description takes. In the
    teacher's frame (``FORMAT_DEMOS``, then ``Task: <description> / Input:``):

    - a pool's share is its probability mass as the input: ``sample`` of its items are scored
      whole (``input_logprobs``) and the mass is ``|pool| * mean p``;
    - within a pool, items are taken by the probability of their first token, which the one
      forward of the frame gives for every item at once (exact for the one-token words; numbers,
      whose first token is a bare space, come out in random order).

    Deterministic for a seed. The task's own inputs, passed in ``exclude``, are never drawn.
    """
    rng = random.Random(f"skill-ranked:{seed}")
    banned = {x.strip().lower() for x in exclude}
    items = {p: _pool_items(model, p, banned) for p in pools}
    items = {p: xs for p, xs in items.items() if xs}
    n = min(n, sum(len(xs) for xs in items.values()))
    if n <= 0:
        return []
    probes = {p: rng.sample(xs, min(sample, len(xs))) for p, xs in items.items()}
    whole, head = input_logprobs(model, description, [x for xs in probes.values() for x in xs])
    mass, at = {}, 0
    for p, xs in probes.items():
        mass[p] = float(torch.logsumexp(whole[at : at + len(xs)], 0)) + math.log(len(items[p]) / len(xs))
        at += len(xs)
    out: list[str] = []
    for p, k in _shares(mass, n).items():
        token = _first_tokens(model.tokenizer, tuple(_POOL_SOURCES[p](model)))
        first = head[[token[x] for x in items[p]]].tolist()
        order = sorted(range(len(items[p])), key=lambda i: (-first[i], rng.random()))
        out += [items[p][i] for i in order[: min(k, len(order))]]
    return out


def decode_batch(
    model: HyperLoRAModel,
    prompts: Sequence[list[int]],
    *,
    adapters: Sequence[Adapter] = (),
    max_new_tokens: int = 16,
    sample: bool = False,
    seed: int = 0,
    rows_per_batch: int = 64,
) -> list[tuple[list[int], bool, torch.Tensor]]:
    """Decode many prompts together: per prompt its new tokens (EOS excluded), whether it ended
    with EOS, and the logits that chose each new token (and the EOS), ``(n, vocab)``.

    One left-padded batch per ``rows_per_batch`` prompts through ``transformers``' ``generate``
    (with ``adapters`` active) instead of one decoding loop per prompt: a skill needs dozens of
    teacher answers, and on a CPU the batched loop is several times faster.
    """
    out: list[tuple[list[int], bool, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG
        torch.manual_seed(seed)
        for start in range(0, len(prompts), rows_per_batch):
            out += _decode_rows(model, prompts[start : start + rows_per_batch], adapters, max_new_tokens, sample)
    return out


MIN_SHARED_PREFIX = 8  # below this, plain left padding (one forward call fewer)


def _shared_prefix(chunk: Sequence[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own."""
    limit, first, k = min(len(p) for p in chunk) - 1, chunk[0], 0
    while k < limit and all(p[k] == first[k] for p in chunk):
        k += 1
    return k


def _decode_rows(
    model: HyperLoRAModel, chunk: Sequence[list[int]], adapters: Sequence[Adapter], max_new_tokens: int, sample: bool
) -> list[tuple[list[int], bool, torch.Tensor]]:
    """One batch through ``generate``. Teacher prompts share a long start (the demonstrations and
    the description): it is prefilled once and its KV cache repeated over the rows, the rows'
    own tokens padded after it (masked, positions from the mask) instead of before it."""
    eos = model.tokenizer.eos_token_id
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else eos
    device = model.base.device
    shared = _shared_prefix(chunk) if len(chunk) > 1 else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    rest = [p[shared:] for p in chunk]
    width = max(len(r) for r in rest)
    head = list(chunk[0][:shared])
    ids = torch.tensor([head + [pad] * (width - len(r)) + r for r in rest], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
    with torch.no_grad(), model.activate(adapters):
        cache = {}
        if shared:
            cache["cache"] = model.model(input_ids=ids[:1, :shared], use_cache=True).cache
            cache["cache"].batch_repeat_interleave(len(chunk))
        gen = model.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_p=0.95 if sample else None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
            **cache,
        )
    logits = torch.stack(gen.logits, dim=1).float()  # (rows, steps, vocab)
    out = []
    for row in range(len(chunk)):
        new = gen.sequences[row, ids.shape[1] :].tolist()
        ended = eos in new
        n = new.index(eos) if ended else len(new)
        out.append((new[:n], ended, logits[row, : n + int(ended)].cpu()))
    return out


def written_inputs(
    model: HyperLoRAModel, description: str, n: int, seed: int, exclude: Iterable[str] = ()
) -> list[str]:
    """Inputs the model writes for the description (sampled, first line, deduplicated).

    A small model's inputs are often off, but they are the only source that follows the task
    when no pool fits it; the teacher's answers to them are what is learned, not the inputs.
    """
    if n <= 0:
        return []
    banned = {x.strip().lower() for x in exclude}
    prompt = model.encode(_WRITE_PROMPT.format(description=description))
    decoded = decode_batch(model, [prompt] * (2 * n), max_new_tokens=16, sample=True, seed=seed)
    out: list[str] = []
    seen: set[str] = set()
    for tokens, _, _ in decoded:  # some samples are empty or repeats
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
        line = next((ln for ln in text.splitlines() if ln.strip()), "").strip().strip("\"'`").strip()
        line = re.sub(r"^(input|example)\s*:\s*", "", line, flags=re.I)
        key = line.lower()
        if line and key not in seen and key not in banned and len(line) <= 120:
            seen.add(key)
            out.append(line)
        if len(out) >= n:
            break
    return out


# ---------------------------------------------------------------------- teacher targets
def teacher_prompt(
    model: HyperLoRAModel,
    description: str,
    text: str,
    formatted: bool,
    demos: Sequence[tuple[str, str, str]] = FORMAT_DEMOS,
) -> list[int]:
    """The teacher's prompt ids: the description in the prompt, in the demonstration frame when
    ``formatted`` (then the assistant turn is prefilled with ``Output:``)."""
    if not formatted:
        return model.encode(text, context=description)
    return model.encode(f"{_demo_frame(demos)}\nTask: {description}\nInput: {text}") + encode_text(
        model.tokenizer, "Output:"
    )


def _unspaced(tokenizer) -> dict[int, int]:
    """Token id of ``" word"`` -> id of ``"word"`` where both are single tokens."""
    vocab = tokenizer.get_vocab()
    return {i: vocab[t[1:]] for t, i in vocab.items() if t.startswith("Ġ") and len(t) > 1 and t[1:] in vocab}


def teacher_sequences(
    model: HyperLoRAModel,
    description: str,
    inputs: Sequence[str],
    *,
    adapters: Sequence[Adapter] = (),
    max_new_tokens: int = 16,
    top_k: int = 20,
    formatted: bool = True,
    temperature: float = 1.0,
) -> list[SoftSequence]:
    """Per input: the teacher's greedy answer and its top-k distribution at each answer token.

    The teacher sees the description before the input (``context=``, as "description in the
    prompt" is measured) and wears ``adapters`` (the instant skill, where there is one); the
    student's prompt is the input alone. An answer that ends with EOS keeps it as a target, so
    the student also learns where to stop.
    """
    eos = model.tokenizer.eos_token_id
    prompts = [teacher_prompt(model, description, text, formatted) for text in inputs]
    decoded = decode_batch(model, prompts, adapters=adapters, max_new_tokens=max_new_tokens)
    newline = {i for i, t in enumerate(model.tokenizer.convert_ids_to_tokens(range(len(model.tokenizer)))) if "Ċ" in t}
    unspaced = _unspaced(model.tokenizer) if formatted else {}
    out: list[SoftSequence] = []
    for text, (tokens, ended, logits) in zip(inputs, decoded, strict=True):
        if formatted:  # the answer is the first line; then the student stops (a one-hot EOS)
            cut = next((i for i, t in enumerate(tokens) if t in newline), len(tokens))
            tokens, logits, ended = tokens[:cut], logits[:cut], True
        else:
            logits = logits[: len(tokens) + int(ended)]
        if not tokens:
            continue
        top = torch.log_softmax(logits / temperature, dim=-1).topk(top_k, dim=-1)
        ids, probs = top.indices.clone(), top.values.exp()
        # After "Output:" the teacher's words carry a leading space that an answer at the start
        # of the assistant turn does not: the first position learns the unspaced tokens.
        ids[0] = torch.tensor([unspaced.get(int(i), int(i)) for i in ids[0]])
        probs = probs / probs.sum(-1, keepdim=True)
        answer = [int(ids[0, 0]) if formatted else tokens[0], *tokens[1:]]
        if formatted or ended:
            answer.append(eos)
            k = ids.shape[1]
            if formatted:  # the EOS row: certain
                ids = torch.cat([ids, torch.full((1, k), eos)])
                probs = torch.cat([probs, torch.tensor([[1.0] + [0.0] * (k - 1)])])
        out.append(SoftSequence(model.encode(text), answer, ids, probs))
    return out


def example_sequences(model: HyperLoRAModel, examples: Sequence[tuple[str, str]], weight: float) -> list[SoftSequence]:
    """Gold (input, output) pairs as one-hot rows: plain cross-entropy, ending with EOS."""
    eos = model.tokenizer.eos_token_id
    out = []
    for given, wanted in examples:
        target = encode_text(model.tokenizer, wanted) + ([eos] if eos is not None else [])
        ids = torch.tensor(target, dtype=torch.long)[:, None]
        out.append(SoftSequence(model.encode(given), target, ids, torch.ones(len(target), 1), weight))
    return out
