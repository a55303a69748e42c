"""Run every condition on the same documents and questions, then aggregate into ``results.json``.

One process, one model, one decoding engine: the conditions are interleaved per document so that
machine noise (this CPU is shared) hits all of them alike rather than whichever ran last. All
ratios the issue asks for are computed here from this run's own numbers, never from constants.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import torch
from tqdm.auto import tqdm

from ..metrics import bootstrap, exact_match, gap_closure, mean, ratio_of_means, token_f1
from .conditions import CONDITIONS, RUN_ORDER, DocumentState, Engine, Settings
from .documents import Document, LengthPlan, build_documents, load_pool
from .memory import PeakRSS, current_rss

SKILL_DESCRIPTION = "Answer each question with a short phrase copied from the document."
BAR_LENGTH = 8192
_NEEDS_PREFIX = {"stuff_kv", "distill"}


@dataclass
class BenchConfig:
    plans: list[LengthPlan]
    conditions: list[str] = field(default_factory=lambda: list(RUN_ORDER))
    settings: Settings = field(default_factory=Settings)
    stuff_queries: dict[int, int] = field(default_factory=dict)  # length -> cap on measured condition-2 queries
    seed: int = 0
    resamples: int = 2000
    skill_runs: int = 5
    skill_consolidate_runs: int = 0  # consolidated skills timed (issue 22's 60 s bar); 0: not measured
    prefill_chunk: int = 2048


# ---------------------------------------------------------------------- environment
def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def checkpoint_info(path: str | os.PathLike | None, trained: bool = True) -> dict:
    """Where a hypernetwork came from and a hash of its weights, so a report names what it measured."""
    if path is None:
        return {"path": None, "trained": trained}
    weights = Path(path) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else None
    info = {"path": str(path), "sha256_16": digest, "trained": trained}
    state = Path(path).parent / "state.safetensors"
    log = Path(path).parent / "log.jsonl"
    if state.is_file() and log.is_file():  # a training run directory: record how far it had got
        try:
            last = json.loads(log.read_text().strip().splitlines()[-1])
            info["training_step"] = last.get("step")
        except (ValueError, IndexError):
            pass
    return info


def environment(argv: list[str] | None) -> dict:
    import transformers

    from .. import __version__

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    return {
        "command": " ".join(["hyperlora bench", *(argv or [])]),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ram_bytes": _total_ram(),
            "device": "cpu",
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hyperlora_integrations": __version__,
            "git_commit": commit,
            "git_dirty": bool(dirty) if dirty is not None else None,
        },
    }


# ---------------------------------------------------------------------- skill latency
def measure_skill(model, runs: int, description: str = SKILL_DESCRIPTION) -> dict:
    """``generate_skill`` latency for a one-sentence description: first call and warm median.

    The first call also loads the description encoder. Warm calls use a new description each
    (the encoder caches embeddings, so repeating one description would time the cache).
    """
    t0 = time.perf_counter()
    adapter = model.generate_skill(description)
    cold = time.perf_counter() - t0
    warm = []
    for i in range(runs):
        t0 = time.perf_counter()
        model.generate_skill(f"{description.rstrip('.')} (variant {i + 1}).")
        warm.append(time.perf_counter() - t0)
    return {
        "description": description,
        "cold_s": cold,
        "warm_median_s": median(warm) if warm else None,
        "warm_runs": len(warm),
        "adapter_bytes": adapter.nbytes,
    }


SKILL_CONSOLIDATE_DESCRIPTIONS = (  # short-answer tasks of the kind a user writes; none is in the eval fixtures
    "Write the opposite of the given English adjective.",
    "Give the number of letters in the given word, as digits.",
    "Name the season in which the given month falls in the northern hemisphere.",
)


def measure_skill_consolidation(model, runs: int, config=None) -> dict:
    """Wall-clock seconds of ``generate_skill(description, consolidate=True)``: the teacher's
    targets (the model answering pool inputs with the description in its prompt) and the
    gradient steps, as the adapter's metadata splits them."""
    out = []
    for description in SKILL_CONSOLIDATE_DESCRIPTIONS[:runs]:
        t0 = time.perf_counter()
        adapter = model.generate_skill(description, consolidate=True, config=config)
        wall = time.perf_counter() - t0
        info = adapter.metadata.model_extra.get("consolidation", {})
        out.append(
            {
                "description": description,
                "wall_s": wall,
                "targets_s": info.get("targets_seconds"),
                "training_s": info.get("seconds"),
                "steps": info.get("steps"),
                "inputs": info.get("distilled_inputs"),
            }
        )
    return {"runs": out, "median_wall_s": median(r["wall_s"] for r in out) if out else None}


# ---------------------------------------------------------------------- the run
def run(
    model,
    cfg: BenchConfig,
    *,
    meta: dict | None = None,
    progress: bool = True,
    on_length: Callable[[dict], None] | None = None,
) -> dict:
    """Build documents, run the conditions, aggregate. Returns the ``results.json`` object.

    ``on_length`` gets the results so far after each length, so a long run that is stopped
    (or runs out of time) still leaves every finished length on disk.
    """
    started = time.time()
    unknown = [c for c in cfg.conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}; choose from {list(CONDITIONS)}")
    order = [c for c in RUN_ORDER if c in cfg.conditions]
    engine = Engine(model, answer_tokens=cfg.settings.answer_tokens, prefill_chunk=cfg.prefill_chunk)

    t0 = time.perf_counter()
    pool = load_pool(cfg.seed)
    documents = build_documents(pool, cfg.plans, model.count_tokens, seed=cfg.seed)
    data_s = time.perf_counter() - t0

    skill = measure_skill(model, cfg.skill_runs) if model.t2l is not None else None
    if cfg.skill_consolidate_runs:
        skill = {**(skill or {}), "consolidated": measure_skill_consolidation(model, cfg.skill_consolidate_runs)}

    def n_queries(length: int, key: str, q: int) -> int:
        if key == "stuff" and "stuff_kv" in order and length in cfg.stuff_queries:
            return min(q, cfg.stuff_queries[length])
        return q

    total_units = sum(
        1 + n_queries(p.tokens, key, len(doc.questions))
        for p in cfg.plans
        for doc in documents[p.tokens]
        for key in order
    )

    def assemble(done):
        return _assemble_results(
            model, cfg, order, meta, started, data_s, documents, skill, rows, preps, distill_logs, done
        )

    bar = tqdm(total=total_units, desc="bench", unit="step", disable=not progress, dynamic_ncols=True)
    rows: list[dict] = []
    preps: list[dict] = []
    distill_logs: list[dict] = []
    for plan in cfg.plans:
        for doc in documents[plan.tokens]:
            state = DocumentState(engine, doc, cfg.settings, _neighbour(doc, plan.tokens, documents, model))
            for key in order:
                cond = CONDITIONS[key]
                bar.set_description(f"{plan.tokens} tok {doc.doc_id} [{cond.number}] {cond.name}")
                with PeakRSS() as mem:
                    prep = cond.prepare(state)
                    bar.update(1)
                    for q in doc.questions[: n_queries(plan.tokens, key, len(doc.questions))]:
                        out = cond.query(state, q)
                        rows.append(_row(plan.tokens, doc.doc_id, key, q, out, measured=True))
                        bar.update(1)
                preps.append(
                    {
                        "length": plan.tokens,
                        "doc_id": doc.doc_id,
                        "condition": key,
                        "prep_s": prep.seconds,
                        "prep_parts": prep.parts,
                        "bytes_per_doc": prep.bytes_kept,
                        "peak_rss": mem.peak,
                        "peak_rss_delta": mem.delta,
                    }
                )
                if key == "distill":
                    d = state.distilled()
                    distill_logs.append({"doc_id": doc.doc_id, "losses": d.losses, "kls": d.kls})
                if not _NEEDS_PREFIX & set(order[order.index(key) + 1 :]):
                    state.release_prefix()  # a 32k-token KV cache is 1.4 GiB: drop it once unused
            # Condition 2 beyond its cap: the prompt is token-for-token condition 3's, so the answer
            # and NLL are copied from condition 3 (flagged, and agreement is checked on the rest).
            for q in doc.questions[n_queries(plan.tokens, "stuff", len(doc.questions)) :] if "stuff" in order else []:
                src = next(r for r in rows if r["qid"] == q.qid and r["condition"] == "stuff_kv")
                untimed = {"ttft_s": None, "total_s": None, "prefill_tokens": None}
                rows.append({**src, **untimed, "condition": "stuff", "measured": False, "copied_from": "stuff_kv"})
            del state
        done_plans = cfg.plans[: cfg.plans.index(plan) + 1]
        if on_length is not None and len(done_plans) < len(cfg.plans):
            on_length(assemble(done=done_plans))
    bar.close()
    return assemble(done=cfg.plans)


def _assemble_results(model, cfg, order, meta, started, data_s, documents, skill, rows, preps, distill_logs, done):
    """The ``results.json`` object from what has been measured for the lengths in ``done``."""
    results = {
        "meta": {
            **(meta or {}),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": time.time() - started,
            "data_s": data_s,
            "final_rss": current_rss(),
            "complete": len(done) == len(cfg.plans),
            "config": {
                "plans": [asdict(p) for p in cfg.plans],
                "conditions": order,
                "answer_tokens": cfg.settings.answer_tokens,
                "rag_chunk_tokens": cfg.settings.rag_chunk_tokens,
                "rag_k": cfg.settings.rag_k,
                "d2l_max_rank": cfg.settings.d2l_max_rank,
                "distill": asdict(cfg.settings.distill),
                "stuff_queries": {str(k): v for k, v in cfg.stuff_queries.items()},
                "prefill_chunk": cfg.prefill_chunk,
                "seed": cfg.seed,
                "bootstrap_resamples": cfg.resamples,
                "model": model.name,
                "model_max_position_embeddings": getattr(model.model.config, "max_position_embeddings", None),
            },
        },
        "conditions": {
            k: {"number": c.number, "name": c.name, "description": c.description}
            for k, c in sorted(CONDITIONS.items(), key=lambda kc: kc[1].number)
            if k in order
        },
        "documents": [doc.summary() for plan in done for doc in documents[plan.tokens]],
        "skill": skill,
        "lengths": [aggregate_length(plan.tokens, order, rows, preps, cfg) for plan in done],
        "distill_losses": distill_logs,
        "preparations": preps,
        "queries": rows,
    }
    results["bar"] = bar_checks(results)
    return results


def _row(length, doc_id, key, q, out, *, measured) -> dict:
    return {
        "length": length,
        "doc_id": doc_id,
        "qid": q.qid,
        "condition": key,
        "source": q.source,
        "depth": q.depth,
        "question": q.question,
        "answers": q.answers,
        "answer": out.answer,
        "f1": token_f1(out.answer, q.answers),
        "em": exact_match(out.answer, q.answers),
        "nll": out.nll,
        "gold_tokens": out.gold_tokens,
        "nll_per_token": out.nll / max(1, out.gold_tokens),
        "ttft_s": out.ttft_s,
        "total_s": out.total_s,
        "prompt_tokens": out.prompt_tokens,
        "prefill_tokens": out.prefill_tokens,
        "measured": measured,
    }


# ---------------------------------------------------------------------- aggregation
def _by_qid(rows, length, key):
    return {r["qid"]: r for r in rows if r["length"] == length and r["condition"] == key}


def aggregate_length(length: int, order: list[str], rows: list[dict], preps: list[dict], cfg: BenchConfig) -> dict:
    """Per condition: quality with bootstrap CIs, costs; then the within-run ratios."""
    boot = {"resamples": cfg.resamples, "seed": cfg.seed}
    per = {k: _by_qid(rows, length, k) for k in order}
    qids = sorted(set.intersection(*(set(v) for v in per.values()))) if per else []
    out: dict = {"length": length, "questions": len(qids), "conditions": {}}
    for key in sorted(order, key=lambda k: CONDITIONS[k].number):
        r = [per[key][q] for q in qids]
        measured = [x for x in per[key].values() if x["measured"]]
        p = [x for x in preps if x["length"] == length and x["condition"] == key]
        entry = {
            "f1": bootstrap([[x["f1"] for x in r]], mean, **boot),
            "em": bootstrap([[x["em"] for x in r]], mean, **boot),
            "nll_per_token": bootstrap([[x["nll_per_token"] for x in r]], mean, **boot),
            "gap_closure": None,
            "measured_queries": len(measured),
            "ttft_s": mean([x["ttft_s"] for x in measured]),
            "total_s": mean([x["total_s"] for x in measured]),
            "total_s_median": median([x["total_s"] for x in measured]) if measured else None,
            "prompt_tokens": mean([x["prompt_tokens"] for x in measured]),
            "prefill_tokens": mean([x["prefill_tokens"] for x in measured]),
            "prep_s": mean([x["prep_s"] for x in p]),
            "prep_parts": {k: mean([x["prep_parts"][k] for x in p]) for k in (p[0]["prep_parts"] if p else {})},
            "bytes_per_doc": mean([x["bytes_per_doc"] for x in p]),
            "peak_rss_delta": max((x["peak_rss_delta"] for x in p), default=None),
            "peak_rss": max((x["peak_rss"] for x in p), default=None),
        }
        if "none" in per and "stuff" in per:
            cols = [[per[k][q]["nll_per_token"] for q in qids] for k in ("none", "stuff", key)]
            entry["gap_closure"] = bootstrap(cols, lambda a, b, c: gap_closure(mean(a), mean(b), mean(c)), **boot)
        out["conditions"][key] = entry
    if "stuff" in per and "stuff_kv" in per:
        both = [q for q in qids if per["stuff"][q]["measured"]]
        out["stuff_vs_kv_agreement"] = {
            "queries": len(both),
            "same_answer": sum(per["stuff"][q]["answer"] == per["stuff_kv"][q]["answer"] for q in both),
            "max_abs_nll_diff": max(
                (abs(per["stuff"][q]["nll"] - per["stuff_kv"][q]["nll"]) for q in both), default=None
            ),
        }
    out["ratios"] = _ratios(out["conditions"], per, qids, boot)
    if "stuff_kv" in out["conditions"]:
        parts = out["conditions"]["stuff_kv"]["prep_parts"]
        out["forward_pass_s"] = parts.get("prefill")
    return out


def _latency_ratio(per, num, den, field_name, boot):
    common = [q for q in per[num] if q in per[den] and per[num][q]["measured"] and per[den][q]["measured"]]
    cols = [[per[num][q][field_name] for q in common], [per[den][q][field_name] for q in common]]
    return bootstrap(cols, ratio_of_means, **boot)


def _neighbour(doc: Document, length: int, documents: dict[int, list[Document]], model) -> Document:
    """Condition 9's other document: the next one of the same length, else the next one in the
    run, else (a one-document run) a fictional dev document, which no question is about."""
    same = documents[length]
    if len(same) > 1:
        return same[(same.index(doc) + 1) % len(same)]
    everyone = [d for docs in documents.values() for d in docs]
    if len(everyone) > 1:
        return everyone[(everyone.index(doc) + 1) % len(everyone)]
    from ..training.eval_fictional import load_fixture

    text = load_fixture("dev")[0]["text"]
    return Document("fictional-dev-0", 0, text, model.count_tokens(text))


def _consolidated_ratios(conds: dict, per: dict, qids: list[str], boot: dict) -> dict:
    """Condition 8 beside the others: its preparation time, and quality against stuffing and D2L."""
    r: dict = {}
    c = conds["consolidated"]
    r["prep_consolidated_s"] = c["prep_s"]
    if "stuff_kv" in conds and conds["stuff_kv"]["prep_parts"].get("prefill"):
        r["prep_consolidated_over_forward_pass"] = c["prep_s"] / conds["stuff_kv"]["prep_parts"]["prefill"]
    for other in ("stuff", "d2l", "none", "consolidated_other"):
        if other in conds:
            cols = [
                [per["consolidated"][q]["nll_per_token"] for q in qids],
                [per[other][q]["nll_per_token"] for q in qids],
            ]
            r[f"nll_consolidated_over_{other}"] = bootstrap(cols, ratio_of_means, **boot)
    for other in ("stuff", "stuff_kv"):
        if other in conds:
            r[f"latency_total_consolidated_over_{other}"] = _latency_ratio(per, "consolidated", other, "total_s", boot)
    return r


def _ratios(conds: dict, per: dict, qids: list[str], boot: dict) -> dict:
    """The issue's within-run ratios: 5/2, 5/3 latency; 5/3 memory; 5/7 preparation; 5/2, 5/4 quality."""
    r: dict = _consolidated_ratios(conds, per, qids, boot) if "consolidated" in conds else {}
    if "d2l" not in conds:
        return r
    d = conds["d2l"]
    for other in ("stuff", "stuff_kv"):
        if other in conds:
            r[f"latency_total_d2l_over_{other}"] = _latency_ratio(per, "d2l", other, "total_s", boot)
            r[f"latency_ttft_d2l_over_{other}"] = _latency_ratio(per, "d2l", other, "ttft_s", boot)
    if "stuff_kv" in conds:
        kv = conds["stuff_kv"]
        r["bytes_d2l_over_stuff_kv"] = d["bytes_per_doc"] / kv["bytes_per_doc"] if kv["bytes_per_doc"] else None
        r["peak_rss_delta_d2l_over_stuff_kv"] = (
            d["peak_rss_delta"] / kv["peak_rss_delta"] if kv.get("peak_rss_delta") else None
        )
        fwd = kv["prep_parts"].get("prefill")
        r["prep_d2l_over_forward_pass"] = d["prep_s"] / fwd if fwd else None
    if "distill" in conds and conds["distill"]["prep_s"]:
        r["prep_d2l_over_distill"] = d["prep_s"] / conds["distill"]["prep_s"]
    for other in ("stuff", "rag"):
        if other in conds:
            cols = [[per["d2l"][q]["f1"] for q in qids], [per[other][q]["f1"] for q in qids]]
            r[f"f1_d2l_over_{other}"] = bootstrap(cols, ratio_of_means, **boot)
            cols = [[per["d2l"][q]["nll_per_token"] for q in qids], [per[other][q]["nll_per_token"] for q in qids]]
            r[f"nll_d2l_over_{other}"] = bootstrap(cols, ratio_of_means, **boot)
    return r


def bar_checks(results: dict) -> dict:
    """The issue's bar, evaluated on this run's numbers (None where a needed number is missing)."""
    lengths = {entry["length"]: entry for entry in results["lengths"]}
    checks: dict = {"length": BAR_LENGTH if BAR_LENGTH in lengths else None}
    entry = lengths.get(BAR_LENGTH)
    if entry:
        ratios = entry["ratios"]
        vs_stuff = (ratios.get("latency_total_d2l_over_stuff") or {}).get("mean")
        vs_kv = (ratios.get("latency_total_d2l_over_stuff_kv") or {}).get("mean")
        by = ratios.get("bytes_d2l_over_stuff_kv")
        checks["latency_5x_below_stuffing"] = None if vs_stuff is None else vs_stuff <= 0.2
        checks["latency_below_kv_reuse"] = None if vs_kv is None else vs_kv < 1.0
        checks["bytes_under_2pct_of_kv_cache"] = None if by is None else by < 0.02
    short = lengths.get(512)  # consolidation issue's bar: a 512-token document in <= 60 s
    checks["consolidation_512_under_60s"] = (
        None
        if not short or short["ratios"].get("prep_consolidated_s") is None
        else short["ratios"]["prep_consolidated_s"] <= 60.0
    )
    checks["prep_under_1p5x_forward"] = {
        str(e["length"]): (
            None
            if e["ratios"].get("prep_d2l_over_forward_pass") is None
            else e["ratios"]["prep_d2l_over_forward_pass"] < 1.5
        )
        for e in results["lengths"]
    }
    return checks
