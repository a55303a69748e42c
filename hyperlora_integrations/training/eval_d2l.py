"""Evaluate a Doc-to-LoRA checkpoint on held-out reading comprehension (``hyperlora eval d2l``).

For each held-out (passage, question, gold answer): gold-answer NLL per token with (a) no
document, (b) the document in the prompt (the distillation teacher), (c) the generated adapter
and no document; and greedy answers scored by token-F1 / exact match. Gap closure is reported
as the ratio of mean gaps, (mean a - mean c) / (mean a - mean b), with a paired bootstrap
interval; per-item ratios are unstable where a question's gap is near zero.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..hypernets import checkpoint as ckpt
from ..metrics import bootstrap, exact_match, mean, token_f1
from ..model import HyperLoRAModel
from .data import d2l_eval_items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora eval d2l", description=__doc__.split("\n")[0])
    p.add_argument("--d2l", default=str(ckpt.SHIPPED["d2l"]), help="checkpoint directory")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--base-model", default=None)
    p.add_argument("--per-source", type=int, default=60, help="questions per held-out source (4 sources)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-generate", action="store_true", help="NLL only (fast)")
    p.add_argument(
        "--consolidated",
        action="store_true",
        help="add consolidated adapters (HyperLoRAModel.consolidate) and their mismatched control (slow: ~1-2 min per passage)",
    )
    p.add_argument("--out", default="runs/eval_d2l.json")
    p.add_argument("--training-log", default=None, help="log.jsonl of the run: plots gap closure vs steps")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _gap(a, b, c):
    den = mean(a) - mean(b)
    return None if abs(den) < 1e-9 else (mean(a) - mean(c)) / den


def _specific(a, b, c, m):
    """Document-specific part: matched (c) minus mismatched (m), in units of the same gap."""
    return (mean(m) - mean(c)) / (mean(a) - mean(b))


def mismatched_index(items, i: int) -> int:
    """The control for item ``i``: the next item of the same source (cyclically) whose passage differs."""
    order = list(range(i + 1, len(items))) + list(range(i))
    it = items[i]
    return next((j for j in order if items[j].source == it.source and items[j].passage != it.passage), i)


def evaluate(
    model: HyperLoRAModel, items, *, generate: bool = True, max_new_tokens: int = 24, consolidated: bool = False
) -> dict:
    """Score every item with no document, the document in the prompt and its adapter.

    Control: the adapter of *another* passage from the same source (``nll_mismatched``). What it
    closes of the gap is what any adapter does (answer style, format); only the difference to
    the matched adapter is knowledge of this document.
    """
    adapters, seconds = [], []
    for it in tqdm(items, desc="internalizing", unit="doc"):
        t0 = time.perf_counter()
        adapters.append(model.internalize(it.passage))
        seconds.append(time.perf_counter() - t0)
    learned: dict[str, object] = {}  # passage -> consolidated adapter (questions share passages)
    if consolidated:
        for it in tqdm(items, desc="consolidating", unit="doc"):
            if it.passage not in learned:
                learned[it.passage] = model.consolidate(it.passage, progress=False)
    rows = []
    for i, it in enumerate(tqdm(items, desc="eval d2l", unit="q")):
        gold = it.answers[0]
        other = mismatched_index(items, i)
        row = {"source": it.source, "internalize_s": seconds[i]}
        conditions = [
            ("none", {}),
            ("context", {"context": it.passage}),
            ("adapter", {"adapters": [adapters[i]]}),
            ("mismatched", {"adapters": [adapters[other]]}),
        ]
        if consolidated:  # the same control, with the other passage's consolidated adapter
            conditions += [
                ("consolidated", {"adapters": [learned[it.passage]]}),
                ("consolidated_mismatched", {"adapters": [learned[items[other].passage]]}),
            ]
        for key, kwargs in conditions:
            nll, n = model.score_detailed(it.question, gold, **kwargs)
            row[f"nll_{key}"] = nll / n
            if generate and "mismatched" not in key:
                answer = model.generate(it.question, max_new_tokens=max_new_tokens, **kwargs).split("\n")[0]
                row[f"answer_{key}"] = answer
                row[f"f1_{key}"] = token_f1(answer, it.answers)
                row[f"em_{key}"] = exact_match(answer, it.answers)
        rows.append(row)
    return {"rows": rows, "summary": summarize(rows, generate)}


def summarize(rows: list[dict], generate: bool) -> dict:
    cols = {k: [r[k] for r in rows] for k in rows[0] if isinstance(rows[0][k], float)}
    out = {
        "n": len(rows),
        "nll": {k: mean(cols[f"nll_{k}"]) for k in ("none", "context", "adapter", "mismatched")},
        "gap_closure": bootstrap([cols["nll_none"], cols["nll_context"], cols["nll_adapter"]], _gap),
        "gap_closure_mismatched": bootstrap([cols["nll_none"], cols["nll_context"], cols["nll_mismatched"]], _gap),
        "gap_closure_specific": bootstrap(
            [cols["nll_none"], cols["nll_context"], cols["nll_adapter"], cols["nll_mismatched"]], _specific
        ),
        "by_source": {},
    }
    if "nll_consolidated" in cols:
        c = [cols["nll_none"], cols["nll_context"], cols["nll_consolidated"], cols["nll_consolidated_mismatched"]]
        out["nll"]["consolidated"] = mean(cols["nll_consolidated"])
        out["nll"]["consolidated_mismatched"] = mean(cols["nll_consolidated_mismatched"])
        out["gap_closure_consolidated"] = bootstrap(c[:3], _gap)
        out["gap_closure_consolidated_specific"] = bootstrap(c, _specific)
        if generate:
            out["f1_consolidated"] = bootstrap([cols["f1_consolidated"]], mean)
    if generate:
        for metric in ("f1", "em"):
            out[metric] = {k: bootstrap([cols[f"{metric}_{k}"]], mean) for k in ("none", "context", "adapter")}
        out["f1_gain_adapter_vs_none"] = bootstrap(
            [cols["f1_adapter"], cols["f1_none"]], lambda c, a: mean(c) - mean(a)
        )
    for source in sorted({r["source"] for r in rows}):
        sub = [r for r in rows if r["source"] == source]
        s_cols = {k: [r[k] for r in sub] for k in ("nll_none", "nll_context", "nll_adapter")}
        entry = {"n": len(sub), "gap_closure": _gap(s_cols["nll_none"], s_cols["nll_context"], s_cols["nll_adapter"])}
        if generate:
            entry.update({f"f1_{k}": mean([r[f"f1_{k}"] for r in sub]) for k in ("none", "context", "adapter")})
        out["by_source"][source] = entry
    return out


def plot_curve(log_path: Path, png: Path) -> None:
    """Gap closure on the training run's fixed held-out probe set, against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [json.loads(line) for line in log_path.read_text().splitlines() if '"gap_closure"' in line]
    # A run whose probe set changed on resume is plotted as one series per probe definition
    # (told apart by their no-document baseline) rather than joining incomparable numbers.
    segments: list[list[dict]] = [[]]
    for p in points:
        if segments[-1] and abs(p["nll_none"] - segments[-1][-1]["nll_none"]) > 1e-3:  # GPU vs CPU rounding
            segments.append([])
        if not segments[-1] or p["step"] > segments[-1][-1]["step"]:
            segments[-1].append(p)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, seg in enumerate(segments):
        label = f"probe set {i + 1} (from step {seg[0]['step']})" if len(segments) > 1 else None
        ax.plot([p["step"] for p in seg], [p["gap_closure"] for p in seg], marker="o", label=label)
    if len(segments) > 1:
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("optimizer step (4 documents each)")
    ax.set_ylabel("gap closure (NLL)")
    ax.set_title("Doc-to-LoRA: held-out gap closure during training")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = HyperLoRAModel.from_pretrained(args.base_model, d2l=args.d2l, t2l=None, device=args.device)
    items = d2l_eval_items(per_source=args.per_source, seed=args.seed)
    result = evaluate(
        model, items, generate=not args.no_generate, max_new_tokens=args.max_new_tokens, consolidated=args.consolidated
    )
    result["meta"] = {
        "checkpoint": args.d2l,
        "command": "hyperlora eval d2l " + " ".join(argv or []),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.training_log:
        plot_curve(Path(args.training_log), out.with_suffix(".curve.png"))
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
