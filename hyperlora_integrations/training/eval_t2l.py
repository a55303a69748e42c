"""Evaluate a Text-to-LoRA checkpoint on held-out tasks (``hyperlora eval t2l``).

Per held-out task, with its own metric (accuracy by option log-likelihood for multiple choice,
token-F1 of the greedy answer for generation):
  (a) base model, input only            (b) base model, description in the prompt
  (c) T2L adapter, input only           (d) T2L adapter + description in the prompt
and two controls for (c): the adapter generated from another held-out task's description
(mismatched) and from a random string of words (random). Averages over tasks come with a
stratified bootstrap (examples resampled within each task).

``--skills`` runs ``eval_skills`` instead: consolidated and few-shot skills (with their
mismatched controls) on the held-out short-answer skills fixture.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..hypernets import checkpoint as ckpt
from ..metrics import token_f1
from ..model import HyperLoRAModel
from .tasks import Task, load_tasks, split

CONDITIONS = ("a_base", "b_desc", "c_adapter", "d_adapter_desc", "c_mismatched", "c_random")
_WORDS = "river lamp quantum seven orange violin marble cloud ticket garden copper whisper engine".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora eval t2l", description=__doc__.split("\n")[0])
    p.add_argument("--t2l", default=str(ckpt.SHIPPED["t2l"]))
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--base-model", default=None)
    add_eval_args(p)
    p.add_argument("--out", default="runs/eval_t2l.json")
    return p.parse_args(argv)


def add_eval_args(p: argparse.ArgumentParser, mc_examples: int = 30, gen_examples: int = 15) -> None:
    """The options ``run_task`` reads, shared by ``eval t2l`` and the probes that score through it."""
    p.add_argument("--mc-examples", type=int, default=mc_examples, help="evaluated examples per multiple-choice task")
    p.add_argument("--gen-examples", type=int, default=gen_examples, help="evaluated examples per generation task")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-input-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def option_choice(model: HyperLoRAModel, prompt: str, options: list[str], **kwargs) -> str:
    """The option with the lowest mean per-token NLL as the assistant's answer."""
    scores = [nll / n for nll, n in model.score_options(prompt, options, **kwargs)]
    return options[min(range(len(options)), key=scores.__getitem__)]


def run_task(
    model: HyperLoRAModel, task: Task, other: Task, n: int, args, rng: random.Random, adapters: dict | None = None
) -> dict[str, list[float]]:
    """Scores per condition. ``adapters`` overrides the three generated ones (the oracle probe
    passes per-task fitted adapters under the same condition names)."""
    description = task.descriptions[0]
    random_desc = " ".join(rng.sample(_WORDS, 8)).capitalize() + "."
    adapters = adapters or {
        "c_adapter": model.generate_skill(description),
        "c_mismatched": model.generate_skill(other.descriptions[0]),
        "c_random": model.generate_skill(random_desc),
    }
    setups = {
        "a_base": {},
        "b_desc": {"context": description},
        "c_adapter": {"adapters": [adapters["c_adapter"]]},
        "d_adapter_desc": {"adapters": [adapters["c_adapter"]], "context": description},
        "c_mismatched": {"adapters": [adapters["c_mismatched"]]},
        "c_random": {"adapters": [adapters["c_random"]]},
    }
    scores: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    tok = model.tokenizer
    for ex in task.examples[:n]:
        prompt = tok.decode(tok(ex.input, add_special_tokens=False).input_ids[: args.max_input_tokens])
        for cond, kwargs in setups.items():
            if task.kind == "mc":
                scores[cond].append(float(option_choice(model, prompt, ex.options, **kwargs) == ex.target))
            else:
                answer = model.generate(prompt, max_new_tokens=args.max_new_tokens, **kwargs)
                scores[cond].append(token_f1(answer, [ex.target]))
    return scores


def run_held_out(
    model: HyperLoRAModel, held: list[Task], args, rng: random.Random, adapters_for=None, desc: str = "eval t2l"
) -> dict[str, dict[str, list[float]]]:
    """``run_task`` over the held-out tasks, each paired with the next one for the mismatched
    control. ``adapters_for(task, other)``, where given, supplies the adapters under the
    condition names (the probes score fitted or closed-form adapters this way)."""
    per_task = {}
    for i, task in enumerate(tqdm(held, desc=desc, unit="task")):
        other = held[(i + 1) % len(held)]
        n = args.mc_examples if task.kind == "mc" else args.gen_examples
        adapters = adapters_for(task, other) if adapters_for else None
        per_task[task.name] = run_task(model, task, other, n, args, rng, adapters=adapters)
    return per_task


def stratified_bootstrap(per_task: dict[str, dict[str, list[float]]], fn, resamples: int = 2000, seed: int = 0):
    """Mean over tasks of ``fn(task_scores)``, with examples resampled within each task."""
    rng = random.Random(seed)

    def stat(sample):
        return sum(fn(s) for s in sample.values()) / len(sample)

    point = stat(per_task)
    values = []
    for _ in range(resamples):
        sample = {}
        for name, scores in per_task.items():
            n = len(next(iter(scores.values())))
            idx = [rng.randrange(n) for _ in range(n)]
            sample[name] = {c: [v[i] for i in idx] for c, v in scores.items()}
        values.append(stat(sample))
    values.sort()
    return {"mean": point, "lo": values[int(0.025 * resamples)], "hi": values[int(0.975 * resamples) - 1]}


def _avg(condition: str):
    return lambda s: sum(s[condition]) / len(s[condition])


def condition_summary(per_task: dict[str, dict[str, list[float]]]) -> dict:
    """Per-task means of every condition and their bootstrapped averages over tasks."""
    return {
        "tasks": {
            name: {c: sum(v) / len(v) for c, v in s.items()} | {"n": len(s["a_base"])} for name, s in per_task.items()
        },
        "average": {c: stratified_bootstrap(per_task, _avg(c)) for c in CONDITIONS},
    }


def difference(per_task: dict[str, dict[str, list[float]]], x: str, y: str) -> dict:
    """Average over tasks of condition ``x`` minus condition ``y`` (paired), with its interval."""
    return stratified_bootstrap(per_task, lambda s: _avg(x)(s) - _avg(y)(s))


def report(
    per_task: dict[str, dict[str, list[float]]], out: str | Path | None, quiet: tuple[str, ...] = (), **extra
) -> dict:
    """The summary of a held-out run (per-condition averages plus ``extra``): printed without the
    per-task table and the ``quiet`` keys, and written with the raw scores to ``out`` where given."""
    summary = {**condition_summary(per_task), **extra}
    print(json.dumps({k: v for k, v in summary.items() if k not in ("tasks", *quiet)}, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"summary": summary, "scores": per_task}, indent=2))
    return summary


def main(argv=None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--skills" in argv:  # the skill-consolidation evaluation on the held-out skills fixture
        from .eval_skills import main as eval_skills

        return eval_skills([a for a in argv if a != "--skills"])
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = HyperLoRAModel.from_pretrained(args.base_model, d2l=None, t2l=args.t2l, device=args.device)
    _, held = split(load_tasks(seed=args.seed))
    per_task = run_held_out(model, held, args, rng)

    return report(
        per_task,
        args.out,
        c_minus_b=difference(per_task, "c_adapter", "b_desc"),
        d_minus_b=difference(per_task, "d_adapter_desc", "b_desc"),
        matched_minus_mismatched=difference(per_task, "c_adapter", "c_mismatched"),
        matched_minus_random=difference(per_task, "c_adapter", "c_random"),
        kinds={t.name: t.kind for t in held},
        command="hyperlora eval t2l " + " ".join(argv or []),
    )


if __name__ == "__main__":
    main()
