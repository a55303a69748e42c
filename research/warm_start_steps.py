"""Steps to quality: does consolidation starting from the instant adapter need fewer steps?

Issue 24, route 4. Each dev document of the fictional fixture (never the test split) is
consolidated from zero and from its one-pass Doc-to-LoRA adapter, for each step count; the
documents' questions are scored (gold-answer NLL per token) with every adapter, with no
document, and with the document in the prompt. Reported per start and step count: mean NLL and
the share of the no-document -> in-prompt gap closed (paired over documents, 95 % bootstrap).

    python -m research.warm_start_steps --threads 1 --limit 4 --steps 10,30 --out docs/results/warm_start_steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.metrics import bootstrap, mean
from hyperlora_integrations.training.eval_fictional import load_fixture


def nll(model: HyperLoRAModel, doc: dict, **kwargs) -> float:
    """Mean gold-answer NLL per token over the document's questions."""
    values = []
    for q in doc["questions"]:
        total, tokens = model.score_detailed(q["question"], q["answer"], **kwargs)
        values.append(total / tokens)
    return sum(values) / len(values)


def summarize(rows: list[dict], steps: list[int]) -> dict:
    """Mean NLL and gap closure per start and step count; instant minus zero, paired by document."""

    def closure(key: str) -> list[float]:
        return [(r["none"] - r[key]) / (r["none"] - r["context"]) for r in rows]

    def entry(key: str) -> dict:
        out = {"nll": mean([r[key] for r in rows]), "gap_closure": bootstrap([closure(key)], mean)}
        if f"{key}_mismatched" in rows[0]:  # another document's adapter: what a generic effect gets
            out["mismatched_gap_closure"] = bootstrap([closure(f"{key}_mismatched")], mean)
            own_minus_other = [a - b for a, b in zip(closure(key), closure(f"{key}_mismatched"), strict=True)]
            out["own_minus_mismatched"] = bootstrap([own_minus_other], mean)
        return out

    summary = {"instant": entry("instant")}
    for n in steps:
        summary[f"zero@{n}"], summary[f"instant@{n}"] = entry(f"zero@{n}"), entry(f"instant@{n}")
        diff = [a - b for a, b in zip(closure(f"instant@{n}"), closure(f"zero@{n}"), strict=True)]
        summary[f"instant_minus_zero@{n}"] = bootstrap([diff], mean)
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=4, help="first N dev documents")
    p.add_argument("--steps", default="10,30", help="comma-separated step counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HyperLoRAModel.from_pretrained()
    if model.d2l is None:
        raise SystemExit("needs a Doc-to-LoRA hypernetwork: the instant adapter is the warm start")
    docs = load_fixture("dev")[: args.limit]
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    kept: dict[tuple[str, int], list] = {(start, n): [] for n in steps for start in ("zero", "instant")}
    for doc in tqdm(docs, desc="documents", unit="doc"):
        instant = model.internalize(doc["text"], progress=False)
        row = {
            "doc": doc["id"],
            "none": nll(model, doc),
            "context": nll(model, doc, context=doc["text"]),
            "instant": nll(model, doc, adapters=[instant]),
        }
        for n in steps:
            for start, init in (("zero", None), ("instant", instant)):
                adapter = model.consolidate(doc["text"], init, steps=n, seed=args.seed, progress=False)
                row[f"{start}@{n}"] = nll(model, doc, adapters=[adapter])
                row[f"{start}@{n}_seconds"] = adapter.metadata.model_extra["consolidation"]["seconds"]
                kept[(start, n)].append(adapter)
        rows.append(row)
    # the control: each document's questions under the next document's adapter (same start, same steps)
    for i, (doc, row) in enumerate(zip(docs, rows, strict=True)):
        for (start, n), adapters in kept.items():
            row[f"{start}@{n}_mismatched"] = nll(model, doc, adapters=[adapters[(i + 1) % len(docs)]])

    summary = summarize(rows, steps)
    result = {
        "command": "python -m research.warm_start_steps " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
        "summary": summary,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
