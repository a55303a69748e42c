"""Serving benchmark: concurrent requests, each with its own document adapter, batched vs serial.

``hyperlora bench serve [--concurrency 1,4,16,32] [--new-tokens 32] [--quick] [--tiny] [--out DIR]``

Each request asks a short question about one of ``max(concurrency)`` distinct documents, with
that document's Doc-to-LoRA adapter active (16 concurrent requests carry 16 different adapters).
Greedy decoding of exactly ``--new-tokens`` tokens (EOS is suppressed with ``min_new_tokens``
so every request does the same work).

* **serial**: the requests run one after another on the one-request path. Serial throughput at
  concurrency ``c`` is ``c x new_tokens`` over the summed time of the first ``c`` requests; the
  latency of request ``k`` is its finish time when all ``c`` arrive together and are served in
  order (what a server without batching gives them).
* **batched**: ``c`` threads submit at once to ``model.enable_batching()``; latency is each
  request's submit-to-last-token time, throughput is ``c x new_tokens`` over the wall time.

Every batched answer's token ids are compared with its serial ones; a difference can only come
from a float-rounding near-tie (batched matmuls round differently), and is reported, never
hidden: ``differing_requests`` and the first differing position per request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

PLACES = ["Port Avel", "Quillhaven", "Drummore", "Saltmere", "Kestrel Bay", "Lindholm", "Varrow", "Ostry"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "grey", "orange"]


def documents(n: int) -> list[tuple[str, str]]:
    """``n`` short, distinct (document, question) pairs."""
    out = []
    for i in range(n):
        place, colour = PLACES[i % len(PLACES)], COLOURS[(i * 3 + i // len(PLACES)) % len(COLOURS)]
        year = 1850 + 7 * i
        doc = (
            f"Record {i}. The lighthouse of {place} number {i} was built in {year} and painted {colour}. "
            f"Its keeper, Ada Morrow the {i + 1}th, lit it every night for {10 + i} years."
        )
        out.append((doc, f"What colour was lighthouse number {i} of {place}, and when was it built?"))
    return out


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_serve(
    model: Any, concurrency: list[int], new_tokens: int, *, progress: bool = True, on_level: Any = None
) -> dict:
    """Measure serial and batched serving at each concurrency level; see the module docstring.

    ``on_level(results)`` is called after each level, so a run cut short keeps what it measured.
    """
    n = max(concurrency)
    sampling = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    t0 = time.perf_counter()
    pairs = documents(n)
    adapters = [model.internalize(doc, source=f"doc{i}") for i, (doc, _) in enumerate(pairs)]
    internalize_s = time.perf_counter() - t0
    questions = [q for _, q in pairs]

    model.disable_batching()
    model.complete(questions[0], [adapters[0]], max_new_tokens=2)  # warm-up, not timed
    serial_lat, serial_ids = [], []
    for i in range(n):
        start = time.perf_counter()
        out = model.complete(questions[i], [adapters[i]], **sampling)
        serial_lat.append(time.perf_counter() - start)
        serial_ids.append(out.token_ids)
        if progress:
            print(f"  serial {i + 1}/{n}: {serial_lat[-1]:.2f} s", file=sys.stderr)

    levels: list[dict] = []
    results_so_far = {
        "new_tokens": new_tokens,
        "documents": n,
        "internalize_s": internalize_s,
        "serial_latencies_s": serial_lat,
        "levels": levels,
    }
    for c in concurrency:
        batcher = model.enable_batching(max_batch_size=max(concurrency))
        results: list[Any] = [None] * c
        latency = [0.0] * c
        barrier = threading.Barrier(c + 1)

        def worker(i: int, barrier: threading.Barrier, results: list, latency: list) -> None:
            barrier.wait()
            start = time.perf_counter()
            results[i] = model.complete(questions[i], [adapters[i]], **sampling)
            latency[i] = time.perf_counter() - start

        threads = [threading.Thread(target=worker, args=(i, barrier, results, latency)) for i in range(c)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        stats = dict(batcher.stats)
        model.disable_batching()
        diffs = {i: _first_difference(results[i].token_ids, serial_ids[i]) for i in range(c)}
        diffs = {i: d for i, d in diffs.items() if d is not None}
        serial_total = sum(serial_lat[:c])
        finish = [sum(serial_lat[: k + 1]) for k in range(c)]  # all arrive at 0, served in order
        level = {
            "concurrency": c,
            "tokens": c * new_tokens,
            "serial": {
                "wall_s": serial_total,
                "tokens_per_s": c * new_tokens / serial_total,
                "latency_p50_s": _percentile(finish, 0.5),
                "latency_p95_s": _percentile(finish, 0.95),
                "latency_alone_p50_s": _percentile(serial_lat[:c], 0.5),
            },
            "batched": {
                "wall_s": wall,
                "tokens_per_s": c * new_tokens / wall,
                "latency_p50_s": _percentile(latency, 0.5),
                "latency_p95_s": _percentile(latency, 0.95),
                "steps": stats["steps"],
                "max_rows": stats["max_rows"],
                "mean_rows_per_step": stats["row_steps"] / max(1, stats["steps"]),
            },
            "speedup": serial_total / wall,
            "differing_requests": len(diffs),
            "first_difference_at": {str(i): d for i, d in diffs.items()},
        }
        levels.append(level)
        if on_level is not None:
            on_level(results_so_far)
        if progress:
            print(
                f"  c={c}: serial {level['serial']['tokens_per_s']:.1f} tok/s, batched "
                f"{level['batched']['tokens_per_s']:.1f} tok/s ({level['speedup']:.2f}x), "
                f"{len(diffs)} of {c} differ",
                file=sys.stderr,
            )
    return results_so_far


def render(results: dict) -> str:
    """The markdown table of a run (what docs/benchmarks.md quotes)."""
    lines = [
        f"Greedy, {results['new_tokens']} new tokens per request, one distinct document adapter per request.",
        "",
        "| concurrent | serial tok/s | batched tok/s | speed-up | serial p50 / p95 latency | "
        "batched p50 / p95 latency | rows/step | requests differing from serial |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in results["levels"]:
        s, b = lv["serial"], lv["batched"]
        lines.append(
            f"| {lv['concurrency']} | {s['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {lv['speedup']:.2f}x | "
            f"{s['latency_p50_s']:.2f} / {s['latency_p95_s']:.2f} s | {b['latency_p50_s']:.2f} / "
            f"{b['latency_p95_s']:.2f} s | {b['mean_rows_per_step']:.1f} | {lv['differing_requests']} of "
            f"{lv['concurrency']} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Throughput and latency against concurrency; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cs = [lv["concurrency"] for lv in results["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("serial", "o--"), ("batched", "s-")):
        ax1.plot(cs, [lv[mode]["tokens_per_s"] for lv in results["levels"]], style, label=mode)
        for q, alpha in (("p50", 1.0), ("p95", 0.5)):
            ax2.plot(
                cs, [lv[mode][f"latency_{q}_s"] for lv in results["levels"]], style, alpha=alpha, label=f"{mode} {q}"
            )
    for ax, label in ((ax1, "generated tokens / s"), (ax2, "request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent requests (one adapter each)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Batched multi-adapter decoding vs serial ({results['new_tokens']} new tokens, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,4,16,32; quick 1,4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 32; quick 8)")
    p.add_argument("--quick", action="store_true", help="levels 1,4 and 8 tokens")
    p.add_argument("--tiny", action="store_true", help="tiny random model and hypernets (tests; numbers meaningless)")
    p.add_argument("--out", default="bench-out/serve", help="output directory (serve.json, serve.md, serve.png)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "1,4,16,32")).split(",")]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        print(f"hyperlora bench serve: bad --concurrency {args.concurrency!r}", file=sys.stderr)
        return 2
    new_tokens = args.new_tokens or (8 if args.quick or args.tiny else 32)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.tiny:
        from ..testing import tiny_hyperlora_model

        model = tiny_hyperlora_model(0)
    else:
        from ..model import HyperLoRAModel

        model = HyperLoRAModel.from_pretrained()
    from .runner import environment

    started = time.perf_counter()
    meta = environment(["serve", *(argv if argv is not None else sys.argv[1:])])
    meta.update({"model": model.name, "tiny": bool(args.tiny)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> bool:
        results["meta"] = {**meta, "wall_s": time.perf_counter() - started}
        (out / "serve.json").write_text(json.dumps(results, indent=1))
        (out / "serve.md").write_text(render(results))
        return plot(results, out / "serve.png")

    results = run_serve(model, levels, new_tokens, progress=not args.no_progress, on_level=save)
    plotted = save(results)
    print(render(results))
    print(f"wrote {out / 'serve.json'}, {out / 'serve.md'}" + (f", {out / 'serve.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
