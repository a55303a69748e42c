"""``report.md`` and PNG plots from a ``results.json`` object.

The report is generated from the results alone (``python -m hyperlora_integrations.bench
--report-only DIR`` re-renders it), so every number in it can be traced to the JSON next to it.
matplotlib is the ``[bench]`` extra; without it the markdown is still written and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

PLOTS = {
    "quality": "quality_vs_length.png",
    "latency": "latency_vs_length.png",
    "memory": "memory_vs_length.png",
    "pareto": "quality_vs_cost.png",
}
_STYLE = {  # one fixed colour and marker per condition across all plots
    "none": ("#7f7f7f", "o"),
    "stuff": ("#1f77b4", "s"),
    "stuff_kv": ("#17becf", "D"),
    "rag": ("#2ca02c", "^"),
    "d2l": ("#d62728", "*"),
    "d2l_rag": ("#ff7f0e", "P"),
    "distill": ("#9467bd", "X"),
    "consolidated": ("#8c564b", "v"),
    "consolidated_other": ("#e377c2", "1"),
}


# ---------------------------------------------------------------------- formatting
def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    x = x + 0.0  # no "-0"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _ci(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    if d.get("lo") is None:
        return _num(d["mean"], digits)
    return f"{_num(d['mean'], digits)} [{_num(d['lo'], digits)}, {_num(d['hi'], digits)}]"


def _bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _sec(s) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.3g} s" if s < 100 else f"{s:,.0f} s"


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# ---------------------------------------------------------------------- markdown
def render_markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    meta, conds = results["meta"], results["conditions"]
    cfg = meta.get("config", {})
    m, v = meta.get("machine", {}), meta.get("versions", {})
    lines = [
        "# Benchmark: internalized adapters vs context stuffing vs top-k RAG",
        "",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Started {meta.get('started', '?')}, wall time {_sec(meta.get('wall_s'))}"
        + ("" if meta.get("complete", True) else " (PARTIAL: the run had not finished every length)"),
        f"- Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, torch threads {m.get('torch_threads', '?')}, "
        f"RAM {_bytes(m.get('ram_bytes'))}, {m.get('platform', '?')}",
        f"- Versions: python {v.get('python')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"hyperlora_integrations {v.get('hyperlora_integrations')}, git {str(v.get('git_commit'))[:12]}"
        + (" (uncommitted changes)" if v.get("git_dirty") else ""),
        f"- Base model: {cfg.get('model')} (position window {cfg.get('model_max_position_embeddings')} tokens)",
    ]
    for kind in ("d2l", "t2l"):
        info = meta.get("checkpoints", {}).get(kind)
        if info:
            step = f", training step {info['training_step']}" if info.get("training_step") is not None else ""
            state = "" if info.get("trained", True) else " (UNTRAINED, random init: latency only)"
            lines.append(
                f"- {kind.upper()} checkpoint: `{info.get('path')}` sha256 {info.get('sha256_16')}{step}{state}"
            )
    plans = ", ".join(f"{_tokens(p['tokens'])}: {p['docs']} doc x {p['questions']} q" for p in cfg.get("plans", []))
    lines += [
        f"- Plan: {plans}; fixed answer length {cfg.get('answer_tokens')} tokens (greedy); "
        f"RAG {cfg.get('rag_k')} x {cfg.get('rag_chunk_tokens')}-token BM25 windows; "
        + (
            f"D2L adapters SVD-compressed to rank {cfg['d2l_max_rank']}; "
            if cfg.get("d2l_max_rank")
            else "D2L adapters uncompressed (rank grows with chunks); "
        )
        + f"distillation {cfg.get('distill', {}).get('steps')} steps at lr {cfg.get('distill', {}).get('lr')}; "
        f"prefill chunk {cfg.get('prefill_chunk')} tokens; {cfg.get('bootstrap_resamples')} bootstrap resamples.",
        "",
        "## Conditions",
        "",
        "| # | Condition | What it does |",
        "|---|---|---|",
    ]
    lines += [f"| {c['number']} | {c['name']} | {c['description']} |" for c in conds.values()]

    lines += ["", "## Bar (issues 8 and 18), evaluated on this run", ""]
    bar = results.get("bar", {})
    if bar.get("length"):
        r = next(e for e in results["lengths"] if e["length"] == bar["length"])["ratios"]
        lines += [
            "| Check | Measured | Pass |",
            "|---|---|---|",
            f"| 8k: per-query latency of 5 at least 5x lower than 2 | 5/2 = {_ci(r.get('latency_total_d2l_over_stuff'))} "
            f"| {_num(bar.get('latency_5x_below_stuffing'))} |",
            f"| 8k: per-query latency of 5 below 3 | 5/3 = {_ci(r.get('latency_total_d2l_over_stuff_kv'))} "
            f"| {_num(bar.get('latency_below_kv_reuse'))} |",
            f"| 8k: bytes per document of 5 under 2% of 3's KV cache | 5/3 = {_num(r.get('bytes_d2l_over_stuff_kv'))} "
            f"| {_num(bar.get('bytes_under_2pct_of_kv_cache'))} |",
        ]
    else:
        lines += ["8k tokens was not in this run's plan: the latency and memory checks were not measured.", ""]
        lines += ["| Check | Measured | Pass |", "|---|---|---|"]
    for e in results["lengths"]:
        ratio = e["ratios"].get("prep_d2l_over_forward_pass")
        ok = bar.get("prep_under_1p5x_forward", {}).get(str(e["length"]))
        if ratio is not None:  # conditions 3 and 5 both ran
            lines.append(
                f"| {_tokens(e['length'])}: preparation of 5 under 1.5x one forward pass | {_num(ratio)}x | {_num(ok)} |"
            )
    short = next((e for e in results["lengths"] if e["length"] == 512), None)
    if short is not None and short["ratios"].get("prep_consolidated_s") is not None:
        lines.append(
            "| 512: a document consolidated (condition 8) in 60 s or less (issue 18), mean over documents "
            f"| {_num(short['ratios']['prep_consolidated_s'])} s | {_num(bar.get('consolidation_512_under_60s'))} |"
        )

    for e in results["lengths"]:
        lines += _length_section(e, conds)

    lines += ["", "## Within-run ratios", "", "| Length | Ratio | Value [95% CI] |", "|---|---|---|"]
    for e in results["lengths"]:
        for name, value in e["ratios"].items():
            lines.append(
                f"| {_tokens(e['length'])} | {name} | {_ci(value) if isinstance(value, dict) else _num(value)} |"
            )

    lines += _depth_section(results)

    lines += _skill_section(results.get("skill"), meta)

    if results.get("distill_losses"):
        lines += ["", "## Context distillation (condition 7) training loss, first -> last step", ""]
        for d in results["distill_losses"]:
            if d["losses"]:
                lines.append(
                    f"- {d['doc_id']}: {d['losses'][0]:.3f} -> {d['losses'][-1]:.3f} ({len(d['losses'])} steps)"
                )

    if plots:
        lines += ["", "## Plots", ""]
        titles = {
            "quality": "Quality vs document length",
            "latency": "Per-query latency vs document length",
            "memory": "Memory per document vs length",
            "pareto": "Quality vs cost",
        }
        for key, name in plots.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({name})", ""]
    lines += ["", "## How to read this", "", *_NOTES]
    return "\n".join(lines) + "\n"


def _skill_section(skill: dict | None, meta: dict) -> list[str]:
    """One-pass skill latency, and the consolidated skills' wall clock when measured."""
    lines = ["", "## `generate_skill` latency (Text-to-LoRA, one-sentence description)", ""]
    if skill and "cold_s" in skill:
        t2l = meta.get("checkpoints", {}).get("t2l", {})
        note = (
            ""
            if t2l.get("trained", True)
            else " The T2L net was untrained (random init); latency does not depend on the weights."
        )
        lines.append(
            f'"{skill["description"]}": first call {_sec(skill["cold_s"])}, warm median {_sec(skill["warm_median_s"])} '
            f"over {skill['warm_runs']} calls, adapter {_bytes(skill['adapter_bytes'])}.{note}"
        )
    else:
        lines.append("Not measured (no Text-to-LoRA network loaded).")
    consolidated = (skill or {}).get("consolidated")
    if consolidated:
        lines += ["", "## Consolidated skills (`generate_skill(..., consolidate=True)`)", ""]
        lines += [
            "| description | wall clock | teacher targets | training | steps | inputs |",
            "|---|---|---|---|---|---|",
        ]
        for r in consolidated["runs"]:
            lines.append(
                f"| {r['description']} | {_sec(r['wall_s'])} | {_sec(r['targets_s'] or 0)} | "
                f"{_sec(r['training_s'] or 0)} | {r['steps']} | {r['inputs']} |"
            )
        lines.append(f"\nMedian wall clock {_sec(consolidated['median_wall_s'])}.")
    return lines


def _length_section(e: dict, conds: dict) -> list[str]:
    lines = [
        "",
        f"## {_tokens(e['length'])}-token documents ({e['questions']} questions)",
        "",
        "| # | Condition | token-F1 [95% CI] | EM | gold NLL/token | gap closure vs 2 | prep/doc | TTFT | total "
        "| prompt tok | prefilled tok | bytes/doc | peak RSS delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, c in e["conditions"].items():
        measured = c["measured_queries"]
        note = f" ({measured} timed)" if measured != e["questions"] else ""
        lines.append(
            f"| {conds[key]['number']} | {conds[key]['name']} | {_ci(c['f1'])} | {_ci(c['em'])} | {_ci(c['nll_per_token'])} "
            f"| {_ci(c['gap_closure'])} | {_sec(c['prep_s'])} | {_sec(c['ttft_s'])} | {_sec(c['total_s'])}{note} "
            f"| {_num(c['prompt_tokens'], 4)} | {_num(c['prefill_tokens'], 4)} | {_bytes(c['bytes_per_doc'])} "
            f"| {_bytes(c['peak_rss_delta'])} |"
        )
    if e.get("forward_pass_s") is not None:
        lines += ["", f"One forward pass over the document (condition 3's prefill): {_sec(e['forward_pass_s'])}."]
    agree = e.get("stuff_vs_kv_agreement")
    if agree and agree["queries"]:
        lines.append(
            f"Conditions 2 and 3 see the same tokens: same answer on {_num(agree['same_answer'])} of {agree['queries']} "
            f"timed queries, largest NLL difference {_num(agree['max_abs_nll_diff'])} nats."
        )
    return lines


def _depth_section(results: dict) -> list[str]:
    buckets = (("start", 0.0, 1 / 3), ("middle", 1 / 3, 2 / 3), ("end", 2 / 3, 1.01))
    rows = results.get("queries", [])
    if not rows:
        return []
    lines = [
        "",
        "## Token-F1 by depth of the answer's passage (all lengths pooled)",
        "",
        "| Condition | " + " | ".join(f"{b[0]} (n)" for b in buckets) + " |",
        "|---|" + "---|" * len(buckets),
    ]
    for key, c in results["conditions"].items():
        cells = []
        for _, lo, hi in buckets:
            vals = [r["f1"] for r in rows if r["condition"] == key and lo <= r["depth"] < hi]
            cells.append(f"{sum(vals) / len(vals):.3f} ({len(vals)})" if vals else "n/a")
        lines.append(f"| {c['number']} {c['name']} | " + " | ".join(cells) + " |")
    return lines


_NOTES = [
    "- Quality: token-F1 and exact match use SQuAD normalisation, best over the gold answers; the answer is the greedy "
    "text up to the end-of-turn token and first line break. Gold NLL/token is the mean per-token negative log-likelihood "
    "of the first gold answer. Gap closure = (NLL_1 - NLL_c) / (NLL_1 - NLL_2): 1 is as good as stuffing, 0 no better "
    "than no document. Brackets are 95% percentile bootstrap intervals over questions (questions of one document are "
    "correlated, so the intervals are if anything too narrow).",
    "- Latency: per query, from building the prompt (retrieval included) to the first token (TTFT) and to the fixed "
    "answer length (total), always the same number of generated tokens. Preparation is per document and paid once.",
    "- Memory: bytes/doc is what a method keeps per document between queries (2: the text; 3: the KV cache; 4: chunk "
    "texts + term tables; 5: the adapter; 6: both; 7: the trained LoRA), in the dtype it is held in. Peak RSS delta is "
    "the process's resident-set growth during that condition's phase (artefacts built by an earlier condition, such as "
    "the index reused by 6, are counted where they were built).",
    "- Condition 2 rows marked 'timed' fewer than the questions: at the longest lengths only that many stuffed queries "
    "were run; the prompt is token-for-token condition 3's, so their quality is taken from condition 3 (the agreement "
    "line above shows the two match where both ran).",
    "- Lengths beyond the model's position window are run anyway for stuffing (RoPE extrapolation); quality there "
    "shows what happens, not what the model was trained for.",
]


# ---------------------------------------------------------------------- plots
def write_plots(results: dict, out: Path) -> dict[str, str]:
    """Write the four PNGs; returns {key: filename} of those written (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    lengths = [e["length"] for e in results["lengths"]]
    conds = results["conditions"]
    written: dict[str, str] = {}

    def save(fig, key: str) -> None:
        fig.tight_layout()
        fig.savefig(out / PLOTS[key], dpi=110)
        plt.close(fig)
        written[key] = PLOTS[key]

    def series(key, getter):
        xs, ys = [], []
        for e in results["lengths"]:
            c = e["conditions"].get(key)
            y = getter(c) if c else None
            if y is not None and math.isfinite(y):
                xs.append(e["length"])
                ys.append(y)
        return xs, ys

    def style(ax, ylabel, logy=False):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_tokens(n) for n in lengths])
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel(ylabel)
        # a log axis needs a positive value (a run with only "no document" keeps no bytes)
        if logy and any(y > 0 for line in ax.get_lines() for y in line.get_ydata() if y is not None):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    # Quality vs length: F1 and gold NLL, with bootstrap intervals.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, c in conds.items():
        color, marker = _STYLE.get(key, ("k", "o"))
        for ax, metric in zip(axes, ("f1", "nll_per_token")):
            pts = [(e["length"], e["conditions"][key][metric]) for e in results["lengths"] if key in e["conditions"]]
            pts = [(x, d) for x, d in pts if d and d.get("mean") is not None]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [d["mean"] for _, d in pts]
            err = [
                [d["mean"] - d["lo"] if d.get("lo") is not None else 0 for _, d in pts],
                [d["hi"] - d["mean"] if d.get("hi") is not None else 0 for _, d in pts],
            ]
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, capsize=3, label=f"{c['number']} {c['name']}")
    style(axes[0], "token-F1 (95% CI)")
    style(axes[1], "gold-answer NLL per token (95% CI)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Quality vs document length")
    save(fig, "quality")

    # Per-query latency vs length: total (solid) and time to first token (dashed).
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, c in conds.items():
        color, marker = _STYLE.get(key, ("k", "o"))
        xs, ys = series(key, lambda c: c["total_s"])
        ax.plot(xs, ys, color=color, marker=marker, label=f"{c['number']} {c['name']} (total)")
        xs, ys = series(key, lambda c: c["ttft_s"])
        ax.plot(xs, ys, color=color, marker=marker, linestyle="--", alpha=0.6)
    style(ax, "seconds per query (dashed: TTFT)", logy=True)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-query latency ({results['meta']['config'].get('answer_tokens')} answer tokens)")
    save(fig, "latency")

    # Memory per document: bytes kept, and peak RSS growth.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, c in conds.items():
        color, marker = _STYLE.get(key, ("k", "o"))
        xs, ys = series(key, lambda c: c["bytes_per_doc"] or None)
        axes[0].plot(xs, ys, color=color, marker=marker, label=f"{c['number']} {c['name']}")
        xs, ys = series(key, lambda c: c["peak_rss_delta"] or None)
        axes[1].plot(xs, ys, color=color, marker=marker, label=f"{c['number']} {c['name']}")
    style(axes[0], "bytes kept per document", logy=True)
    style(axes[1], "peak RSS growth during the condition (bytes)", logy=True)
    axes[0].legend(fontsize=8)
    fig.suptitle("Memory per document vs length")
    save(fig, "memory")

    # Quality vs cost: per-query latency and per-document preparation, one marker per condition,
    # marker size by length; the Pareto frontier (lower cost, higher F1) is drawn per length.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, cost, label in zip(axes, ("total_s", "prep_s"), ("seconds per query", "preparation seconds per document")):
        for i, e in enumerate(results["lengths"]):
            pts = []
            for key, c in e["conditions"].items():
                x, y = c.get(cost), (c["f1"] or {}).get("mean")
                if x is None or y is None or x <= 0:
                    continue
                color, marker = _STYLE.get(key, ("k", "o"))
                ax.scatter(x, y, color=color, marker=marker, s=25 + 25 * i, alpha=0.8)
                pts.append((x, y))
            front, best = [], -1.0
            for x, y in sorted(pts):
                if y > best:
                    front.append((x, y))
                    best = y
            if len(front) > 1:
                ax.plot(*zip(*front), color="k", alpha=0.25 + 0.15 * i, linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("token-F1")
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D(
            [],
            [],
            color=_STYLE.get(k, ("k", "o"))[0],
            marker=_STYLE.get(k, ("k", "o"))[1],
            linestyle="",
            label=f"{c['number']} {c['name']}",
        )
        for k, c in conds.items()
    ]
    axes[0].legend(handles=handles, fontsize=8)
    fig.suptitle("Quality vs cost (bigger markers: longer documents; grey line: Pareto frontier per length)")
    save(fig, "pareto")
    return written


def write_report(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    path = out / "report.md"
    text = render_markdown(results, plots)
    if not plots:
        text += "\n(matplotlib is not installed: `pip install 'hyperlora-integrations[bench]'` for the plots.)\n"
    path.write_text(text)
    return path
