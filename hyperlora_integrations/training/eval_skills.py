"""Skills that depend on their description (``hyperlora eval t2l --skills``; issue 22).

The fixture (``bench/fixtures/heldout_skills.json``) holds short-answer tasks written for this
project: a description and 12 (input, gold) pairs each; ``test`` tasks are held out (no Text-to-
LoRA training family covers them; never tuned on), ``dev`` tasks tune the recipe. Per task the
first ``--shots`` pairs are the few-shot examples and the rest are the questions. Per question:
exact match of the greedy answer's first line and the gold answer's NLL per token, under

- ``base``: the input alone;  ``desc``: the description in the prompt;
- ``instant``: the one-pass skill adapter alone;  ``instant_desc``: it plus the description;
- ``consolidated``: ``generate_skill(consolidate=True)`` alone (no description in the prompt);
  the task's inputs are kept out of its training inputs, so every question is new to it;
- ``mismatched``: the next task's consolidated skill (the control: a generic "answer tersely"
  adapter passes the first bar, only a skill that carries its description passes this one);
- ``fewshot`` / ``fewshot_mismatched``: ``generate_skill(examples=shots)``, own and next task's;
- ``instant_mismatched``: the next task's instant skill (with ``--instant-only``, which scores only
  the Text-to-LoRA conditions: the way to compare two hypernetwork checkpoints, ``--t2l``).

Intervals: 95 % paired bootstrap over questions (``metrics.bootstrap``). Adapters are cached
under ``--cache``: a killed run resumes, and rescoring is free.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..consolidation.skill import SkillConsolidationConfig, consolidate_skill
from ..lora import Adapter
from ..metrics import bootstrap, exact_match, mean
from ..model import HyperLoRAModel

FIXTURE = Path(__file__).resolve().parent.parent / "bench" / "fixtures" / "heldout_skills.json"
CONDITIONS = (
    "base",
    "desc",
    "instant",
    "instant_desc",
    "instant_mismatched",
    "consolidated",
    "mismatched",
    "fewshot",
    "fewshot_mismatched",
)


def load_skill_tasks(split: str = "test", path: Path = FIXTURE) -> dict[str, dict]:
    """Tasks of one split (``test``, ``dev`` or ``all``) by name, in fixture order."""
    tasks = json.loads(Path(path).read_text())["tasks"]
    return {name: t for name, t in tasks.items() if split == "all" or t["split"] == split}


def _pairs(task: dict) -> list[tuple[str, str]]:
    return [(ex["input"], ex["output"]) for ex in task["examples"]]


def cached_skill(
    model: HyperLoRAModel,
    name: str,
    task: dict,
    kind: str,
    config: SkillConsolidationConfig,
    shots: int,
    cache: Path | None,
    seed: int,
) -> Adapter:
    """The task's ``consolidated`` or ``fewshot`` skill, from ``cache`` when made before."""
    pairs = _pairs(task)
    key_text = f"{model.fingerprint}|{config.model_dump_json()}|{seed}|{shots}|{kind}|{json.dumps(task)}"
    path = cache / f"{name}-{kind}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.safetensors" if cache else None
    if path is not None and path.exists():
        return Adapter.load(path)
    # generate_skill's path, called directly so the task's inputs can be kept out of training
    start = time.perf_counter()
    instant = model.generate_skill(task["description"]) if model.t2l is not None else None
    adapter = consolidate_skill(
        model,
        task["description"],
        instant,
        examples=pairs[:shots] if kind == "fewshot" else None,
        distill=kind == "consolidated",
        config=config,
        seed=seed,
        exclude_inputs=[x for x, _ in pairs],
    )
    adapter.metadata.consolidation["total_seconds"] = round(time.perf_counter() - start, 3)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(adapter.to_bytes())
        tmp.replace(path)
    return adapter


def first_line(text: str) -> str:
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def score_task(
    model: HyperLoRAModel, task: dict, adapters: dict[str, Adapter], shots: int, max_new_tokens: int
) -> dict[str, dict[str, list[float]]]:
    """Per condition, per question: exact match and gold NLL per token."""
    description = task["description"]
    setups = {
        "base": {},
        "desc": {"context": description},
        "instant": {"adapters": [adapters["instant"]]} if "instant" in adapters else None,
        "instant_desc": {"adapters": [adapters["instant"]], "context": description} if "instant" in adapters else None,
        "instant_mismatched": {"adapters": [adapters["instant_mismatched"]]}
        if "instant_mismatched" in adapters
        else None,
        "consolidated": {"adapters": [adapters["consolidated"]]} if "consolidated" in adapters else None,
        "mismatched": {"adapters": [adapters["mismatched"]]} if "consolidated" in adapters else None,
        "fewshot": {"adapters": [adapters["fewshot"]]} if "fewshot" in adapters else None,
        "fewshot_mismatched": {"adapters": [adapters["fewshot_mismatched"]]} if "fewshot" in adapters else None,
    }
    out: dict[str, dict[str, list[float]]] = {}
    for cond, kwargs in setups.items():
        if kwargs is None:
            continue
        em, nll = [], []
        for given, gold in _pairs(task)[shots:]:
            answer = model.generate(given, max_new_tokens=max_new_tokens, **kwargs)
            em.append(exact_match(first_line(answer), [gold]))
            total, n = model.score_detailed(given, gold, **kwargs)
            nll.append(total / n)
        out[cond] = {"em": em, "nll": nll}
    return out


def _column(per_task: dict, cond: str, metric: str) -> list[float]:
    return [v for scores in per_task.values() for v in scores[cond][metric]]


def summarize(per_task: dict, seconds: list[float]) -> dict:
    """Means with intervals per condition, and the paired differences the bar reads."""
    conds = [c for c in CONDITIONS if all(c in s for s in per_task.values())]
    summary: dict = {
        "questions": len(_column(per_task, "base", "em")),
        "tasks": len(per_task),
        "conditions": {c: {m: bootstrap([_column(per_task, c, m)], mean) for m in ("em", "nll")} for c in conds},
    }

    def diff(x: str, y: str, metric: str) -> dict:
        return bootstrap([_column(per_task, x, metric), _column(per_task, y, metric)], lambda a, b: mean(a) - mean(b))

    pairs = {
        "em_consolidated_minus_desc": ("consolidated", "desc", "em"),
        "nll_mismatched_minus_consolidated": ("mismatched", "consolidated", "nll"),
        "nll_consolidated_minus_desc": ("consolidated", "desc", "nll"),
        "em_consolidated_minus_mismatched": ("consolidated", "mismatched", "em"),
        "nll_desc_minus_instant_desc": ("desc", "instant_desc", "nll"),
        "em_instant_desc_minus_desc": ("instant_desc", "desc", "em"),
        "em_fewshot_minus_desc": ("fewshot", "desc", "em"),
        "nll_instant_mismatched_minus_instant": ("instant_mismatched", "instant", "nll"),
        "nll_desc_minus_instant": ("desc", "instant", "nll"),
        "nll_fewshot_mismatched_minus_fewshot": ("fewshot_mismatched", "fewshot", "nll"),
    }
    summary["differences"] = {k: diff(*v) for k, v in pairs.items() if v[0] in conds and v[1] in conds}
    for own, other, key in (
        ("consolidated", "mismatched", "own_beats_mismatched_nll"),
        ("instant", "instant_mismatched", "instant_own_beats_mismatched_nll"),
    ):
        if own in conds and other in conds:
            pairs_ = zip(_column(per_task, own, "nll"), _column(per_task, other, "nll"), strict=True)
            summary[key] = bootstrap([[float(o < m) for o, m in pairs_]], mean)
    summary["consolidation_seconds"] = {"mean": mean(seconds), "max": max(seconds, default=None), "n": len(seconds)}
    return summary


def add_skill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test", choices=("test", "dev", "all"))
    p.add_argument("--fixture", default=str(FIXTURE))
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the whole split)")
    p.add_argument("--shots", type=int, default=3, help="pairs per task used as few-shot examples, not asked")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's training steps")
    p.add_argument("--written", type=int, default=None, help="override how many inputs the model writes")
    p.add_argument("--no-teacher-instant", action="store_true", help="the teacher does not wear the instant skill")
    p.add_argument("--temperature", type=float, default=None, help="override the teacher's temperature")
    p.add_argument("--no-fewshot", action="store_true", help="skip the few-shot conditions (half the fitting)")
    p.add_argument(
        "--instant-only", action="store_true", help="only the Text-to-LoRA conditions (no fitting): compare checkpoints"
    )
    p.add_argument("--cache", default="runs/eval_skills")
    p.add_argument("--adapters-only", action="store_true", help="make and cache the adapters, score nothing")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, model: HyperLoRAModel | None = None) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model or HyperLoRAModel.from_pretrained(args.base_model, d2l=None, t2l=args.t2l, device=args.device)
    tasks = load_skill_tasks(args.split, Path(args.fixture))
    if args.tasks:
        tasks = {n: tasks[n] for n in args.tasks.split(",")}
    config = SkillConsolidationConfig()
    update = {}
    if args.steps is not None:
        update["training"] = config.training.model_copy(update={"steps": args.steps})
    if args.written is not None:
        update["written"] = args.written
    if args.no_teacher_instant:
        update["teacher_instant"] = False
    if args.temperature is not None:
        update["temperature"] = args.temperature
    config = SkillConsolidationConfig.model_validate({**config.model_dump(), **update})
    cache = Path(args.cache) if args.cache else None
    names = list(tasks)
    made: dict[str, dict[str, Adapter]] = {}
    seconds = []
    kinds = () if args.instant_only else ("consolidated",) if args.no_fewshot else ("consolidated", "fewshot")
    if args.instant_only and model.t2l is None:
        raise SystemExit("--instant-only needs a Text-to-LoRA checkpoint (--t2l)")
    for name in tqdm(names, desc="skills", unit="task", disable=not kinds):
        made[name] = {}
        for kind in kinds:
            made[name][kind] = cached_skill(model, name, tasks[name], kind, config, args.shots, cache, args.seed)
            if kind == "consolidated":
                seconds.append(made[name][kind].metadata.model_extra["consolidation"]["total_seconds"])
    if args.adapters_only:
        return {"seconds": seconds}
    per_task = {}
    for i, name in enumerate(tqdm(names, desc="scoring", unit="task")):
        other = names[(i + 1) % len(names)]
        adapters = {}
        if "consolidated" in made[name]:
            adapters |= {"consolidated": made[name]["consolidated"], "mismatched": made[other]["consolidated"]}
        if "fewshot" in made[name]:
            adapters |= {"fewshot": made[name]["fewshot"], "fewshot_mismatched": made[other]["fewshot"]}
        if model.t2l is not None:
            adapters["instant"] = model.generate_skill(tasks[name]["description"])
            if args.instant_only:
                adapters["instant_mismatched"] = model.generate_skill(tasks[other]["description"])
        per_task[name] = score_task(model, tasks[name], adapters, args.shots, args.max_new_tokens)
    summary = summarize(per_task, seconds)
    summary["config"] = config.model_dump(mode="json")
    summary["split"] = args.split
    summary["shots"] = args.shots
    return {"summary": summary, "scores": per_task}


def parse_args(argv=None) -> argparse.Namespace:
    from ..hypernets import checkpoint as ckpt

    p = argparse.ArgumentParser(prog="hyperlora eval t2l --skills", description=__doc__.split("\n")[0])
    p.add_argument("--t2l", default=str(ckpt.SHIPPED["t2l"]), help="checkpoint dir, or 'none' (skills from zero)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--base-model", default=None)
    add_skill_args(p)
    p.add_argument("--out", default="runs/eval_skills.json")
    args = p.parse_args(argv)
    args.t2l = None if args.t2l == "none" else args.t2l
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if "summary" in result:
        result["summary"]["command"] = "hyperlora eval t2l --skills " + " ".join(argv or [])
        print(json.dumps({k: v for k, v in result["summary"].items() if k != "config"}, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
