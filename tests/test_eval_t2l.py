"""The held-out summary of `eval t2l` and its probes: averages, paired differences, the report file."""

from __future__ import annotations

import json

from hyperlora_integrations.training.eval_t2l import CONDITIONS, difference, report


def _scores(better: float) -> dict[str, list[float]]:
    base = [0.0, 1.0, 0.0, 1.0]
    return {c: [min(1.0, v + better) for v in base] if c == "c_adapter" else list(base) for c in CONDITIONS}


def test_report_averages_tasks_pairs_differences_and_writes_the_scores(tmp_path, capsys):
    per_task = {"t1": _scores(1.0), "t2": _scores(0.0)}
    out = tmp_path / "nested" / "eval.json"
    summary = report(
        per_task, out, quiet=("bulky",), c_minus_b=difference(per_task, "c_adapter", "b_desc"), bulky={"x": 1}
    )
    # t1: adapter 1.0 vs 0.5, t2: 0.5 vs 0.5 -> mean gap 0.25; a resample's gap lies in [0, 0.5]
    gap = summary["c_minus_b"]
    assert gap["mean"] == 0.25 and 0 <= gap["lo"] < 0.25 < gap["hi"] <= 0.5
    assert summary["average"]["b_desc"]["mean"] == 0.5
    assert summary["tasks"]["t1"]["c_adapter"] == 1.0 and summary["tasks"]["t1"]["n"] == 4
    printed = json.loads(capsys.readouterr().out)
    assert "bulky" not in printed and "tasks" not in printed and "c_minus_b" in printed
    saved = json.loads(out.read_text())
    assert saved["scores"] == per_task and saved["summary"]["bulky"] == {"x": 1}


def test_every_training_module_with_a_main_runs_as_python_m():
    """The docs give `python -m hyperlora_integrations.training.<module>` commands: a module whose
    `main` is not called under `__main__` would exit 0 having done nothing."""
    import ast
    from pathlib import Path

    import hyperlora_integrations.training as training

    for path in sorted(Path(training.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert guards and "main()" in ast.unparse(guards[-1]), f"{path.name} defines main() but never runs it"


def test_run_held_out_pairs_each_task_with_the_next_and_scores_every_condition(tiny_model):
    import random

    from hyperlora_integrations.training.eval_t2l import parse_args, run_held_out
    from hyperlora_integrations.training.tasks import Example, Task

    mc = Task("mc_task", "mc", ["Pick yes or no."], [Example(f"Is {i} even?", "yes", ["yes", "no"]) for i in range(3)])
    gen = Task("gen_task", "gen", ["Repeat the word."], [Example("Say cat.", "cat"), Example("Say dog.", "dog")])
    args = parse_args(["--mc-examples", "2", "--gen-examples", "1", "--max-new-tokens", "2"])

    per_task = run_held_out(tiny_model, [mc, gen], args, random.Random(0))
    assert set(per_task) == {"mc_task", "gen_task"}
    assert all(set(s) == set(CONDITIONS) for s in per_task.values())
    assert {len(v) for v in per_task["mc_task"].values()} == {2} and {
        len(v) for v in per_task["gen_task"].values()
    } == {1}
    assert all(x in (0.0, 1.0) for v in per_task["mc_task"].values() for x in v)

    pairs = []
    skill = tiny_model.generate_skill("anything")

    def adapters_for(task, other):
        pairs.append((task.name, other.name))
        return {"c_adapter": skill, "c_mismatched": skill, "c_random": skill}

    same = run_held_out(tiny_model, [mc, gen], args, random.Random(0), adapters_for)
    assert pairs == [("mc_task", "gen_task"), ("gen_task", "mc_task")]
    # one adapter under all three names: the three conditions score alike
    assert all(s["c_adapter"] == s["c_mismatched"] == s["c_random"] for s in same.values())
