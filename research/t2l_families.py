"""Does training on procedural task families make Text-to-LoRA carry its description? (issue 22, part 2)

The shipped hypernetwork's instant skill alone is no better than another task's (docs/text-to-
lora.md): it learnt "answer tersely", not the task. ``training/task_families.py`` adds short-answer
families where the same inputs map to different outputs under different descriptions; this
compares two checkpoints on tasks neither was trained on:

- the held-out families (whole groups: numeral systems, letters, calendar; 20 questions each, the
  families' first description), written to ``--out-dir/heldout_families.json`` at run time (the
  data comes from registry packages and is never committed);
- the held-out skills fixture's test tasks (``bench/fixtures/heldout_skills.json``).

Per checkpoint and task set, ``hyperlora eval t2l --skills --instant-only``: gold NLL and exact
match of the input alone, the description in the prompt, the instant skill alone, with the
description, and **another task's instant skill** (the control). A checkpoint carries its
description when its own instant skill beats another task's, with an interval above 0.

    hyperlora train t2l --init hyperlora_integrations/checkpoints/t2l-smollm2-135m --family-tasks ...
    python -m research.t2l_families --candidate runs/t2l-families/checkpoint --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyperlora_integrations.hypernets import checkpoint as ckpt
from hyperlora_integrations.training import eval_skills


def write_family_fixture(path: Path, words, per_family: int = 20, seed: int = 0) -> Path:
    from hyperlora_integrations.training.task_families import family_tasks

    _, held = family_tasks(words, seed=seed)
    tasks = {
        name.split("/", 1)[1]: {
            "split": "test",
            "description": task.descriptions[0],
            "examples": [{"input": e.input, "output": e.target} for e in task.examples[:per_family]],
        }
        for name, task in held.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tasks": tasks}, indent=1))
    return path


def _digest(summary: dict) -> dict:
    return {
        "conditions": summary["conditions"],
        "differences": summary["differences"],
        "instant_own_beats_mismatched_nll": summary.get("instant_own_beats_mismatched_nll"),
    }


def shipped_minus_candidate(baseline: dict, candidate: dict) -> dict:
    """Per instant condition, shipped − candidate gold NLL, paired by question (> 0: the
    candidate is better), from two ``eval t2l --skills`` outputs on the same fixture."""
    from hyperlora_integrations.metrics import bootstrap, mean

    out = {}
    for cond in ("instant", "instant_desc", "instant_mismatched"):
        cols = [eval_skills._column(r["scores"], cond, "nll") for r in (baseline, candidate)]
        out[cond] = bootstrap(cols, lambda a, b: mean(a) - mean(b))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--candidate", required=True, help="the retrained Text-to-LoRA checkpoint directory")
    p.add_argument("--baseline", default=str(ckpt.SHIPPED["t2l"]))
    p.add_argument("--out-dir", default="runs/t2l_families")
    p.add_argument("--per-family", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--sets", default="families,skills")
    p.add_argument("--checkpoints", default="baseline,candidate", help="which to score (one at a time is resumable)")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    from transformers import AutoTokenizer

    from hyperlora_integrations.base_model import default_model_dir
    from hyperlora_integrations.consolidation.skill_targets import vocab_words

    words = vocab_words(AutoTokenizer.from_pretrained(default_model_dir()))
    fixtures = {
        "families": write_family_fixture(out / "heldout_families.json", words, args.per_family),
        "skills": eval_skills.FIXTURE,
    }
    results: dict = {}
    for which in args.sets.split(","):
        scored = {}  # label -> the eval's output, scored now or by an earlier call
        for label, t2l in (("baseline", args.baseline), ("candidate", args.candidate)):
            saved = out / f"{which}_{label}.json"
            if label in args.checkpoints.split(","):
                argv_ = ["--t2l", t2l, "--instant-only", "--shots", "0" if which == "families" else "3"]
                argv_ += ["--fixture", str(fixtures[which]), "--threads", str(args.threads)]
                argv_ += ["--max-new-tokens", str(args.max_new_tokens), "--cache", ""]
                scored[label] = eval_skills.main([*argv_, "--out", str(saved)])
            elif saved.exists():
                scored[label] = json.loads(saved.read_text())
            if label in scored:
                results[f"{which}/{label}"] = _digest(scored[label]["summary"])
        if len(scored) == 2:
            results[f"{which}/shipped_minus_candidate"] = shipped_minus_candidate(
                scored["baseline"], scored["candidate"]
            )
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    for key, r in results.items():
        if key.endswith("shipped_minus_candidate"):
            print(key, json.dumps({c: round(v["mean"], 3) for c, v in r.items()}))
            continue
        d = r["differences"]
        print(
            key,
            json.dumps(
                {
                    "nll": {c: round(v["nll"]["mean"], 3) for c, v in r["conditions"].items()},
                    "em": {c: round(v["em"]["mean"], 3) for c, v in r["conditions"].items()},
                    "mismatched_minus_own": d.get("nll_instant_mismatched_minus_instant"),
                }
            ),
        )
    return results


if __name__ == "__main__":
    main()
