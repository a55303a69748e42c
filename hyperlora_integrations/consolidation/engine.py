"""``consolidate``: learn a document into a LoRA adapter by gradient steps ("sleep mode").

The one-pass hypernetwork gives an adapter at once, but (measured, docs/doc-to-lora.md) it does
not yet carry what the document says. A few dozen Adam steps on self-supervised targets from the
document alone do. Long documents are consolidated chunk by chunk (memory stays bounded) and the
chunk adapters are rank-concatenated, then cut to the byte budget with a truncated SVD.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import ValidationError
from tqdm.auto import tqdm

from ..chat import check_text, encode_text
from ..errors import DocumentTooLargeError, EmptyDocumentError, InvalidInputError
from ..lora import Adapter, AdapterMetadata, compress, concat
from .config import ConsolidationConfig
from .targets import Example, build_examples, schedule, segments_of_words, sentences
from .trainer import fit

if TYPE_CHECKING:
    from ..model import HyperLoRAModel

MAX_DOCUMENT_TOKENS = 262_144


def tokenize_examples(model: HyperLoRAModel, examples: list[Example], max_tokens: int) -> list[tuple[list, list]]:
    """Chat-encode each example; the target ends with EOS so the adapter also learns to stop."""
    eos = model.tokenizer.eos_token_id
    out = []
    for ex in examples:
        prompt = model.encode([{"role": "user", "content": ex.prompt}])
        target = encode_text(model.tokenizer, ex.target) + ([eos] if eos is not None else [])
        room = max_tokens - len(prompt)
        if room < 2:
            prompt, room = prompt[-(max_tokens // 2) :], max_tokens - max_tokens // 2
        out.append((prompt, target[:room]))
    return out


def by_length(seqs: list[tuple[list, list]], batch_size: int, seed: int) -> list[tuple[list, list]]:
    """Reorder so each batch holds sequences of similar length, batches in a seeded random order.

    A step pads its batch to the longest sequence; one recitation among short cloze turns would
    make the whole batch pay for it. Same sequences, same count: only padding goes away.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return [seqs[i] for batch in batches for i in batch]


def _chunks(model: HyperLoRAModel, text: str, chunk_tokens: int) -> tuple[list[str], int]:
    """``round(tokens / chunk_tokens)`` chunks of about equal length, cut between sentences.

    Balanced, never "full chunks and the rest": every chunk gets a whole fit, so a 519-token
    document cut at 512 used to spend half its time learning a 15-token sliver (and gave that
    sliver half the rank-concatenated adapter). Chunks are therefore between about 0.67 and 1.5
    times ``chunk_tokens``.
    """
    n_tokens = len(encode_text(model.tokenizer, text))
    if n_tokens > MAX_DOCUMENT_TOKENS:
        raise DocumentTooLargeError(f"document of {n_tokens} tokens is over {MAX_DOCUMENT_TOKENS}; split it first")
    k = max(1, round(n_tokens / chunk_tokens))
    if k == 1:
        return [text], n_tokens
    chars_per_token = len(text) / max(1, n_tokens)
    # a sentence longer than half a chunk (text without punctuation) is cut into word runs
    pieces = [p for s in sentences(text) for p in segments_of_words(s, int(chunk_tokens / 2 * chars_per_token))]
    sizes = [len(encode_text(model.tokenizer, p)) for p in pieces]
    per_chunk, done = sum(sizes) / k, 0
    groups: list[list[str]] = [[] for _ in range(k)]
    for piece, size in zip(pieces, sizes, strict=True):  # each piece goes where its middle falls
        groups[min(k - 1, int((done + size / 2) // per_chunk))].append(piece)
        done += size
    return [" ".join(g) for g in groups if g], n_tokens


def consolidate(
    model: HyperLoRAModel,
    text: str,
    adapter: Adapter | None = None,
    *,
    config: ConsolidationConfig | None = None,
    steps: int | None = None,
    time_budget_s: float | None = None,
    seed: int = 0,
    progress: bool | None = None,
    source: str = "",
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Adapter:
    """Train an adapter that carries ``text``, from ``adapter`` (e.g. the instant one) or zero.

    Works for any base model, with or without a trained hypernetwork. ``steps`` overrides the
    config's steps per chunk; ``time_budget_s`` caps the whole run (split over chunks). The
    result's metadata has ``consolidated=True`` and a ``consolidation`` summary (steps, loss
    curve, seconds). ``should_stop`` is polled every step; when it returns true the run raises
    ``ConsolidationInterrupted`` (a background worker shutting down). A document longer than one chunk starts every chunk from zero: the instant
    adapter of a long document is a rank-concatenation over chunks that do not line up with ours.
    """
    check_text(text, "document")
    if not text.strip():
        raise EmptyDocumentError("the document is empty or whitespace only")
    if config is not None and not isinstance(config, ConsolidationConfig):
        raise InvalidInputError(f"config must be a ConsolidationConfig, got {type(config).__name__}")
    config = config or ConsolidationConfig()
    if steps is not None:
        try:
            config = ConsolidationConfig.model_validate({**config.model_dump(), "steps": steps})
        except ValidationError as exc:
            raise InvalidInputError(f"steps={steps!r}: {exc.errors()[0]['msg']}") from None
    if time_budget_s is not None and time_budget_s <= 0:
        raise InvalidInputError(f"time_budget_s must be positive, got {time_budget_s}")
    if adapter is not None:
        adapter = model._checked([adapter])[0]
    chunks, n_tokens = _chunks(model, text, config.chunk_tokens)
    weights = {"recite": config.recite, "continuation": config.continuation, "fact": config.fact}
    weights["cloze"] = config.cloze
    show = progress if progress is not None else False
    parts, summaries = [], []
    with tqdm(total=config.steps * len(chunks), desc="consolidating", unit="step", disable=not show) as bar:

        def step_done(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if on_step is not None:
                on_step(step, loss)

        for i, chunk in enumerate(chunks):
            examples = build_examples(chunk, segment_chars=config.recite_chars)
            drawn = schedule(examples, weights, config.steps * config.batch_size, seed + i)
            seqs = by_length(tokenize_examples(model, drawn, config.max_seq_tokens), config.batch_size, seed + i)
            budget = None if time_budget_s is None else time_budget_s / len(chunks)
            init = adapter if (adapter is not None and len(chunks) == 1) else None
            result = fit(
                model,
                seqs,
                config,
                init=init,
                seed=seed + i,
                time_budget_s=budget,
                progress=step_done,
                should_stop=should_stop,
            )
            parts.append(Adapter(result.A, result.B))
            summaries.append(result)
    combined = concat(parts) if len(parts) > 1 else parts[0]
    if combined.nbytes > config.max_bytes:
        per_rank = combined.nbytes / combined.rank
        combined = compress(combined, max(1, int(config.max_bytes // per_rank)))
    losses = [r.losses for r in summaries]
    meta = AdapterMetadata.for_document(
        text,
        base_model=model.name,
        base_fingerprint=model.fingerprint,
        source=source,
        num_tokens=n_tokens,
        num_chunks=len(chunks),
        consolidated=True,
        consolidation={
            "steps": sum(r.steps for r in summaries),
            "seconds": round(sum(r.seconds for r in summaries), 3),
            "loss_first": round(sum(curve[0] for curve in losses) / len(losses), 4),
            "loss_last": round(sum(sum(curve[-5:]) / len(curve[-5:]) for curve in losses) / len(losses), 4),
            "stopped": "time_budget" if any(r.stopped == "time_budget" for r in summaries) else "steps",
            "init": "instant" if adapter is not None and len(chunks) == 1 else "zero",
            "frozen_layers_cached": all(r.cached for r in summaries),
            "packed": all(r.packed for r in summaries),
            "seed": seed,
            "config": config.model_dump(mode="json"),
        },
    )
    return Adapter(combined.A, combined.B, scaling=combined.scaling, metadata=meta)
