"""Command line of the benchmark: ``hyperlora bench [--quick] [--tiny] [--out DIR]``.

``hyperlora bench structured ...`` runs the structured-output benchmark instead (``structured.py``),
``hyperlora bench serve ...`` the batched multi-adapter serving benchmark (``serve.py``).

The default plan is the full run reported in ``docs/benchmarks.md``; its question counts are
budgeted so that it finishes in about an hour on a 2-core CPU (see the cost table there): the
32k-token stuffed queries dominate, so condition 2 is timed on only a few of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Documents x questions per length; docs/benchmarks.md has the cost estimate behind these counts.
FULL_PLAN = "512:5x2,2048:4x3,8192:2x5,32768:1x5"
FULL_STUFF_QUERIES = "32768:1"  # condition 2 timed on 1 of the 32k questions (each is ~10 minutes of prefill)
QUICK_PLAN = "512:1x2,2048:1x3"
TINY_PLAN = "512:1x2,2048:1x2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hyperlora bench",
        description="Adapters (Doc-to-LoRA) vs context stuffing vs KV reuse vs top-k RAG vs context distillation.",
    )
    p.add_argument("--quick", action="store_true", help=f"small plan ({QUICK_PLAN}), under 10 minutes on 2 cores")
    p.add_argument("--tiny", action="store_true", help="tiny random model and hypernets (tests; numbers meaningless)")
    p.add_argument("--out", default="bench-out", help="output directory (results.json, report.md, PNGs)")
    p.add_argument("--d2l", default="default", help="Doc-to-LoRA checkpoint directory (default: the shipped one)")
    p.add_argument("--t2l", default="default", help="Text-to-LoRA checkpoint directory (default: the shipped one)")
    p.add_argument("--base-model", default=None, help="HF id or local path (default: embedded SmolLM2-135M)")
    p.add_argument("--plan", default=None, help=f"LENGTH:DOCSxQUESTIONS,... (default {FULL_PLAN})")
    p.add_argument(
        "--stuff-queries",
        default=None,
        help=f"LENGTH:N,... time condition 2 on only N questions at LENGTH (default {FULL_STUFF_QUERIES} in the full run)",
    )
    p.add_argument(
        "--conditions",
        default=None,
        help="comma-separated subset of: none,stuff,stuff_kv,rag,d2l,d2l_rag,distill,consolidated,consolidated_other",
    )
    p.add_argument("--answer-tokens", type=int, default=16, help="fixed number of generated tokens per query")
    p.add_argument(
        "--d2l-max-rank",
        type=int,
        default=None,
        help="compress each Doc-to-LoRA adapter to this rank (internalize(max_rank=)); default: uncompressed",
    )
    p.add_argument("--rag-k", type=int, default=4, help="chunks retrieved per query")
    p.add_argument("--rag-chunk-tokens", type=int, default=128, help="tokens per retrieval chunk")
    p.add_argument(
        "--distill-steps", type=int, default=None, help="gradient steps of condition 7 (default 20; quick 8)"
    )
    p.add_argument("--distill-lr", type=float, default=5e-3)
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward pass")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 2000; quick 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skill-consolidate",
        type=int,
        default=0,
        metavar="N",
        help="also time N consolidated skills (generate_skill(..., consolidate=True); at most 3)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true", help="re-render report.md and plots from OUT/results.json")
    return p.parse_args(argv)


def _caps(spec: str | None) -> dict[int, int]:
    if not spec:
        return {}
    caps = {}
    for part in spec.split(","):
        length, _, n = part.partition(":")
        caps[int(length)] = int(n)
    return caps


def load_model(args):
    """The model under test and where its hypernetworks came from (for the report)."""
    from ..hypernets import TextToLoRA
    from ..hypernets.checkpoint import SHIPPED
    from ..model import HyperLoRAModel
    from .runner import checkpoint_info

    if args.tiny:
        from ..testing import tiny_hyperlora_model

        model = tiny_hyperlora_model(args.seed)
        return model, {
            "d2l": {"path": "tiny random", "trained": False},
            "t2l": {"path": "tiny random", "trained": False},
        }
    model = HyperLoRAModel.from_pretrained(args.base_model, d2l=args.d2l, t2l=args.t2l)
    if model.d2l is None:
        raise SystemExit(
            f"no Doc-to-LoRA checkpoint (looked for {args.d2l!r}); pass --d2l DIR, e.g. --d2l runs/d2l/checkpoint"
        )
    info = {"d2l": checkpoint_info(SHIPPED["d2l"] if args.d2l == "default" else args.d2l)}
    if model.t2l is None:
        # generate_skill's latency does not depend on the weights, so an untrained net measures it
        # honestly; the report flags it so nobody reads skill quality into it.
        model.t2l = TextToLoRA.for_model(model).eval().requires_grad_(False)
        info["t2l"] = {"path": None, "trained": False}
    else:
        info["t2l"] = checkpoint_info(SHIPPED["t2l"] if args.t2l == "default" else args.t2l)
    return model, info


def build_config(args):
    from .conditions import RUN_ORDER, Settings
    from .distill import DistillConfig
    from .documents import LengthPlan
    from .runner import BenchConfig

    quick = args.quick or args.tiny
    plan = args.plan or (TINY_PLAN if args.tiny else QUICK_PLAN if args.quick else FULL_PLAN)
    caps = (
        args.stuff_queries if args.stuff_queries is not None else (None if quick or args.plan else FULL_STUFF_QUERIES)
    )
    steps = args.distill_steps if args.distill_steps is not None else (4 if args.tiny else 8 if quick else 20)
    conditions = [c.strip() for c in args.conditions.split(",")] if args.conditions else list(RUN_ORDER)
    return BenchConfig(
        plans=LengthPlan.parse(plan),
        conditions=conditions,
        settings=Settings(
            answer_tokens=args.answer_tokens,
            rag_chunk_tokens=args.rag_chunk_tokens,
            rag_k=args.rag_k,
            d2l_max_rank=args.d2l_max_rank,
            distill=DistillConfig(steps=steps, lr=args.distill_lr, seed=args.seed),
        ),
        stuff_queries=_caps(caps),
        seed=args.seed,
        resamples=args.resamples or (1000 if quick else 2000),
        skill_runs=3 if quick else 5,
        skill_consolidate_runs=args.skill_consolidate,
        prefill_chunk=args.prefill_chunk,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["structured"]:  # constrained vs prompted structured output (bench/structured.py)
        from .structured import main as structured_main

        return structured_main(argv[1:])
    if argv[:1] == ["serve"]:  # batched multi-adapter serving vs serial (bench/serve.py)
        from .serve import main as serve_main

        return serve_main(argv[1:])
    args = parse_args(argv)
    out = Path(args.out)
    from .report import write_report

    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        print(f"wrote {write_report(results, out)}")
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from .runner import environment, run

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        cfg = build_config(args)
    except ValueError as exc:
        print(f"hyperlora bench: {exc}", file=sys.stderr)
        return 2
    model, checkpoints = load_model(args)
    meta = environment(argv)
    meta["checkpoints"] = checkpoints
    meta["tiny"] = bool(args.tiny)
    out.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> Path:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return write_report(results, out)

    results = run(model, cfg, meta=meta, progress=not args.no_progress, on_length=save)
    report = save(results)
    print(f"wrote {out / 'results.json'} and {report} ({results['meta']['wall_s']:.0f} s)")
    return 0
