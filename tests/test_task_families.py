"""Procedural task families for Text-to-LoRA (issue 22, part 2) and the checkpoint comparison."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("num2words")
pytest.importorskip("inflect")
pytest.importorskip("pycountry")

from hyperlora_integrations.consolidation.skill_targets import vocab_words  # noqa: E402
from hyperlora_integrations.metrics import normalize_answer  # noqa: E402
from hyperlora_integrations.training import task_families as tf  # noqa: E402
from hyperlora_integrations.training.eval_skills import FIXTURE  # noqa: E402


@pytest.fixture(scope="module")
def families(tiny_model):
    return tf.family_tasks(vocab_words(tiny_model.tokenizer), n=60)


def test_families_are_right_deterministic_and_held_out_by_group(families, tiny_model):
    train, held = families
    assert len(train) >= 10 and len(held) >= 4 and not set(train) & set(held)
    groups = {f.name: f.group for f in tf.FAMILIES}
    assert not {groups[n.split("/")[1]] for n in train} & set(tf.HELD_OUT_GROUPS)
    assert {groups[n.split("/")[1]] for n in held} == set(tf.HELD_OUT_GROUPS)
    answers = {e.input: e.target for e in held["family/roman_numerals"].examples}
    assert all(answers.get(k, v) == v for k, v in {"14": "XIV", "49": "XLIX", "90": "XC"}.items())
    assert all(e.target == format(int(e.input), "b") for e in held["family/binary"].examples)
    assert all(e.target == e.input[::-1] for e in held["family/reverse_word"].examples)
    assert all(len(set(t.descriptions)) >= 5 and len(t.examples) >= 12 for t in (*train.values(), *held.values()))
    assert all(len({e.input for e in t.examples}) == len(t.examples) for t in train.values())
    again, _ = tf.family_tasks(vocab_words(tiny_model.tokenizer), n=60)
    assert [e.input for e in again["family/double"].examples] == [e.input for e in train["family/double"].examples]


def test_no_family_answers_a_question_of_the_skills_fixture(families):
    train, held = families
    fixture = json.loads(FIXTURE.read_text())["tasks"]
    questions = {
        (normalize_answer(e["input"]), normalize_answer(e["output"])) for t in fixture.values() for e in t["examples"]
    }
    pairs = {
        (normalize_answer(e.input), normalize_answer(e.target))
        for t in (*train.values(), *held.values())
        for e in t.examples
    }
    assert not questions & pairs
    descriptions = {t["description"] for t in fixture.values()}
    assert not descriptions & {d for f in tf.FAMILIES for d in f.descriptions}


def test_t2l_training_draws_families_for_its_share_of_each_step(tmp_path):
    from hyperlora_integrations.training import train_t2l

    path = tmp_path / "tasks.json"
    tasks = [
        {"name": f"t{i}", "descriptions": [f"Answer {i}."], "examples": [{"input": "x?", "target": "y"}] * 2}
        for i in range(3)
    ]
    path.write_text(json.dumps(tasks))
    out = tmp_path / "run"
    train_t2l.main(
        ["--tiny", "--tasks-json", str(path), "--out", str(out), "--family-tasks", "--tasks-per-step", "4"]
        + ["--latent-dim", "32", "--steps", "2", "--eval-every", "1", "--max-input-tokens", "32"]
    )
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(sum(n.startswith("family/") for n in r["tasks"]) == 2 for r in log)  # --family-share 0.5
    held = {f"family/{f.name}" for f in tf.FAMILIES if f.group in tf.HELD_OUT_GROUPS}
    assert not held & {n for r in log for n in r["tasks"]}
    assert "heldout_ce_matched" in log[-1]  # the probe reads the held-out families


def test_instant_only_evaluation_scores_the_mismatched_control(tiny_model, tmp_path):
    from hyperlora_integrations.training import eval_skills

    fixture = {
        name: {"split": "test", "description": d, "examples": [{"input": x, "output": y} for x, y in pairs]}
        for name, d, pairs in (
            ("double", "Double the number.", [("2", "4"), ("5", "10")]),
            ("reverse", "Write the word backwards.", [("cat", "tac"), ("dog", "god")]),
        )
    }
    path = tmp_path / "fixture.json"
    path.write_text(json.dumps({"tasks": fixture}))
    args = eval_skills.parse_args(
        ["--fixture", str(path), "--instant-only", "--shots", "0", "--max-new-tokens", "2", "--cache", ""]
    )
    result = eval_skills.run(args, model=tiny_model)
    summary = result["summary"]
    assert set(summary["conditions"]) == {"base", "desc", "instant", "instant_desc", "instant_mismatched"}
    assert summary["questions"] == 4 and "nll_instant_mismatched_minus_instant" in summary["differences"]
    assert 0 <= summary["instant_own_beats_mismatched_nll"]["mean"] <= 1


def test_the_comparison_writes_held_out_families_in_the_fixture_format(tmp_path, tiny_model):
    from hyperlora_integrations.training.eval_skills import load_skill_tasks
    from research.t2l_families import write_family_fixture

    path = write_family_fixture(tmp_path / "f.json", vocab_words(tiny_model.tokenizer), per_family=5)
    tasks = load_skill_tasks("test", path)
    held = {f.name for f in tf.FAMILIES if f.group in tf.HELD_OUT_GROUPS}
    assert set(tasks) == held and all(len(t["examples"]) == 5 for t in tasks.values())


def test_the_comparison_pairs_candidate_and_shipped_by_question():
    from research.t2l_families import shipped_minus_candidate

    def run(shift):
        scores = {
            c: {"nll": [1.0 + shift + i for i in range(4)], "em": [0.0] * 4}
            for c in ("instant", "instant_desc", "instant_mismatched")
        }
        return {"scores": {"a": scores, "b": scores}}

    diff = shipped_minus_candidate(run(0.5), run(0.0))
    assert set(diff) == {"instant", "instant_desc", "instant_mismatched"}
    # paired: the per-question spread cancels, so the interval is the shift itself
    assert diff["instant"]["mean"] == pytest.approx(0.5) and diff["instant"]["lo"] == pytest.approx(0.5)
