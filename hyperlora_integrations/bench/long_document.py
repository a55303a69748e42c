"""Doc-to-LoRA on a document longer than the model's window: a fact in its last chunk.

Each test document is held-out passages (distractors) up to ``--tokens`` tokens, ending with
one *needle* passage that fills its last chunk; the question is about the needle. The whole
document is internalized with ``model.internalize`` (chunk by chunk, one chunk's activations at
a time), and the gold answer is scored with no document and with the adapter. For reference,
the needle alone is also put in the prompt and internalized on its own (a one-chunk document).
The process's peak resident memory is read after every internalization: the claim is that it
stays bounded whatever the document length. Run in a fresh process for a clean peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..chat import encode_text
from ..encoders.activations import chunk_ids
from ..hypernets import checkpoint as ckpt
from ..metrics import bootstrap, mean, token_f1
from ..model import HyperLoRAModel
from .documents import PASSAGE_SEPARATOR, load_pool


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora eval long", description=__doc__.split("\n")[0])
    p.add_argument("--d2l", default=str(ckpt.SHIPPED["d2l"]), help="checkpoint directory")
    p.add_argument("--base-model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=32768, help="document length in tokens")
    p.add_argument("--docs", type=int, default=6, help="documents (one needle question each)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval_long.json")
    return p.parse_args(argv)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(model: HyperLoRAModel, tokens: int, docs: int, seed: int):
    """``docs`` (text, needle item) pairs; the needle starts exactly at a chunk boundary."""
    tok, chunk_len = model.tokenizer, model.d2l.config.chunk_len
    pool = load_pool(seed)
    short = (it for it in pool if len(encode_text(tok, it.passage)) <= chunk_len - 8)
    needles = list(islice(short, docs))  # stops tokenizing the pool once there are enough
    used = {it.passage for it in needles}
    filler_ids = encode_text(tok, PASSAGE_SEPARATOR.join(it.passage for it in pool if it.passage not in used))
    out = []
    for k, needle in enumerate(needles):
        n_fill = (tokens - chunk_len) // chunk_len * chunk_len
        start = (k * 997) % max(1, len(filler_ids) - n_fill)  # a different stretch of distractors each
        fill = filler_ids[start : start + n_fill]
        out.append((fill, needle))
    return out


def main(argv=None, model: HyperLoRAModel | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if model is None:
        model = HyperLoRAModel.from_pretrained(args.base_model, d2l=args.d2l, t2l=None, device=args.device)
    tok, chunk_len = model.tokenizer, model.d2l.config.chunk_len
    rss_loaded = peak_rss_gib()
    rows = []
    for fill, needle in tqdm(build(model, args.tokens, args.docs, args.seed), desc="long documents", unit="doc"):
        # Token-level assembly keeps the needle in the last chunk exactly.
        ids = fill + encode_text(tok, needle.passage)
        text = tok.decode(ids)
        text_ids = encode_text(tok, text)  # as internalize tokenizes it
        chunks = chunk_ids(text_ids, chunk_len)
        in_last = " ".join(needle.passage.split()[:8]) in tok.decode(chunks[-1])
        t0 = time.perf_counter()
        adapter = model.internalize(text, progress=False)
        seconds = time.perf_counter() - t0
        peak = peak_rss_gib()
        alone = model.internalize(needle.passage)
        q, gold = needle.question, needle.answers[0]
        row = {
            "source": needle.source,
            "tokens": len(text_ids),
            "chunks": len(chunks),
            "needle_in_last_chunk": in_last,
            "internalize_s": seconds,
            "peak_rss_gib": peak,
        }
        for key, kwargs in (
            ("none", {}),
            ("adapter", {"adapters": [adapter]}),
            ("needle_adapter", {"adapters": [alone]}),
            ("needle_context", {"context": needle.passage}),
        ):
            nll, n = model.score_detailed(q, gold, **kwargs)
            row[f"nll_{key}"] = nll / n
            answer = model.generate(q, max_new_tokens=args.max_new_tokens, **kwargs).split("\n")[0]
            row[f"answer_{key}"] = answer
            row[f"f1_{key}"] = token_f1(answer, needle.answers)
        rows.append(row)
    cols = {k: [r[k] for r in rows] for k in rows[0] if isinstance(rows[0][k], float)}
    summary = {
        "n": len(rows),
        "tokens": mean([r["tokens"] for r in rows]),
        "chunks": mean([r["chunks"] for r in rows]),
        "needle_in_last_chunk": all(r["needle_in_last_chunk"] for r in rows),
        "peak_rss_gib": max(cols["peak_rss_gib"]),
        "rss_after_load_gib": rss_loaded,
        "internalize_s": mean(cols["internalize_s"]),
        "nll": {k: mean(cols[f"nll_{k}"]) for k in ("none", "adapter", "needle_adapter", "needle_context")},
        "f1": {k: mean(cols[f"f1_{k}"]) for k in ("none", "adapter", "needle_adapter", "needle_context")},
        "nll_gain_adapter_vs_none": bootstrap([cols["nll_none"], cols["nll_adapter"]], lambda a, c: mean(a) - mean(c)),
        "questions_adapter_beats_none": sum(r["nll_adapter"] < r["nll_none"] for r in rows),
        "meta": {
            "command": "hyperlora eval long " + " ".join(argv or []),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "checkpoint": args.d2l,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
