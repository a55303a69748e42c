"""Every experiment in research/ still runs: its ``main`` end to end on the tiny random model.

The real model and the task/document data are swapped for the tiny model and a handful of
made-up tasks and passages, so the numbers are meaningless; the code paths are the experiments'.
``fit_library.fit_task`` is also covered by tests/test_reconstruction.py, and
``calibrate_skill_threshold``'s calibration by tests/test_newcomer_skills.py.
"""

from __future__ import annotations

import json
import sys

import pytest

from hyperlora_integrations.bench.documents import Document, Question
from hyperlora_integrations.hypernets import checkpoint as ckpt
from hyperlora_integrations.testing import tiny_hyperlora_model
from hyperlora_integrations.training.data import EvalItem
from hyperlora_integrations.training.library import load_library
from hyperlora_integrations.training.tasks import Example, Task


def _task(name: str, descriptions: list[str], pairs: list[tuple[str, str]]) -> Task:
    return Task(name, "gen", descriptions, [Example(q, a) for q, a in pairs])


TRAIN = [
    _task(
        "capitals",
        ["Answer with the capital city.", "Give the capital.", "Name the capital."],
        [("France?", "Paris"), ("Italy?", "Rome"), ("Spain?", "Madrid")],
    ),
    _task(
        "currencies",
        ["Answer with the currency.", "Name the money used there.", "Which currency?"],
        [("Japan?", "Yen"), ("France?", "Euro"), ("India?", "Rupee")],
    ),
    _task(
        "colours",
        ["Name the colour.", "Which colour is it?", "Give the colour."],
        [("Grass?", "Green"), ("Sky?", "Blue"), ("Snow?", "White")],
    ),
]
HELD = [
    Task(
        "yes_no",
        "mc",
        ["Answer yes or no.", "Reply with yes or no.", "Yes or no?"],
        [Example(q, a, ["yes", "no"]) for q, a in [("Is ice cold?", "yes"), ("Is fire cold?", "no")] * 2],
    ),
    _task(
        "animals",
        ["Name the animal.", "Which animal is it?", "Give the animal."],
        [("Barks?", "Dog"), ("Meows?", "Cat"), ("Moos?", "Cow"), ("Neighs?", "Horse")],
    ),
]
ALL = {t.name: t for t in TRAIN + HELD}
PASSAGES = [
    ("Ilse Tramweg founded the Varn observatory in 2031.", [("Who founded it?", "Ilse Tramweg."), ("When?", "2031.")]),
    ("The Halcyon Drift sailed from Oslo in May.", [("What sailed?", "The Halcyon Drift."), ("From?", "Oslo.")]),
    ("Mirelle Oduya grows pears in Tarn.", [("Who grows pears?", "Mirelle Oduya."), ("Where?", "In Tarn.")]),
]


class _Tiny:
    """Stands in for ``HyperLoRAModel`` in an experiment's module: ``from_pretrained`` -> the tiny model."""

    model = None

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls.model


@pytest.fixture()
def tiny(monkeypatch):
    """The tiny model, served by every experiment module's ``HyperLoRAModel.from_pretrained``
    and with the tasks above as the task data."""
    _Tiny.model = tiny_hyperlora_model(seed=3)
    for name in (
        "fit_library",
        "probe_oracle",
        "probe_oracle_t2l",
        "library_neighbours",
        "library_ce",
        "ridge_task_metric",
        "adapter_diversity",
        "long_document_scaling",
        "probe_consolidation_speed",
        "probe_teacher_speed",
        "probe_skill_teacher",
        "warm_start_steps",
        "consolidated_library",
    ):
        module = __import__(f"research.{name}", fromlist=["_"])
        monkeypatch.setattr(module, "HyperLoRAModel", _Tiny)
        if hasattr(module, "load_tasks"):
            monkeypatch.setattr(module, "load_tasks", lambda *a, **k: dict(ALL))
        if hasattr(module, "split"):
            monkeypatch.setattr(module, "split", lambda tasks: (list(TRAIN), list(HELD)))
    return _Tiny.model


@pytest.fixture()
def library(tiny, tmp_path):
    """A fitted library (train and held splits) written by ``research.fit_library``."""
    from research import fit_library

    folder = tmp_path / "library"
    for split_name in ("train", "held"):
        args = ["--split", split_name, "--steps", "2", "--batch", "2", "--max-input-tokens", "32", "--out", str(folder)]
        fit_library.main([*args, "--eval-mc", "1", "--eval-gen", "1"])
    return folder


def test_fit_library_writes_both_splits_and_resumes(library):
    from research import fit_library

    assert sorted(load_library(library, "train")) == ["capitals", "colours", "currencies"]
    assert sorted(load_library(library, "held")) == ["animals", "yes_no"]
    before = {p.name: p.stat().st_mtime_ns for p in library.glob("*.json")}
    fit_library.main(["--split", "train", "--steps", "2", "--out", str(library)])  # all fitted: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in library.glob("*.json")} == before


def test_probe_encoder(monkeypatch, tmp_path):
    from hyperlora_integrations.testing import tiny_base_model
    from research import probe_encoder

    monkeypatch.setattr(probe_encoder, "load_base_model", lambda: tiny_base_model(seed=3))
    monkeypatch.setattr(probe_encoder, "load_tasks", lambda *a, **k: dict(ALL))
    out = tmp_path / "probe_encoder.json"
    rows = probe_encoder.main(["--layers", "1", "--tasks", "4", "--out", str(out)])
    assert len(rows) == 2 and 0.0 <= rows[0]["nearest_task_accuracy"] <= 1.0
    assert json.loads(out.read_text())["command"].startswith("python -m research.probe_encoder")


def test_probe_oracle(tiny, monkeypatch, tmp_path):
    from research import probe_oracle

    monkeypatch.setattr(probe_oracle, "passages_with_questions", lambda *a, **k: list(PASSAGES))
    out = tmp_path / "probe_oracle.json"
    summary = probe_oracle.main(["--passages", "3", "--steps", "1", "--max-qas", "1", "--out", str(out)])
    assert summary["passages"] == 3 and set(summary["nll"]) >= {"fitted", "fitted_other", "hypernet"}
    assert len(json.loads(out.read_text())["rows"]) == 3


def test_probe_oracle_t2l(tiny, tmp_path):
    from research import probe_oracle_t2l

    out = tmp_path / "probe_oracle_t2l.json"
    args = ["--steps", "1", "--batch", "1", "--fit-examples", "2", "--mc-examples", "1", "--gen-examples", "1"]
    probe_oracle_t2l.main([*args, "--max-new-tokens", "2", "--out", str(out)])
    assert set(json.loads(out.read_text())["summary"]["fit_loss"]) == {"yes_no", "animals"}


@pytest.fixture()
def coefficients(library, monkeypatch, tmp_path):
    """``library_neighbours --weighted --coefficients`` on the library (base-model encoder only)."""
    from research import library_neighbours

    monkeypatch.setattr(library_neighbours, "ENCODERS", ("base-mean",))
    path = tmp_path / "coef.json"
    out = tmp_path / "neighbours.json"
    args = ["--library", str(library), "--weighted", "--coefficients", str(path), "--out", str(out)]
    result = library_neighbours.main(args)
    assert set(result["tasks"]) == {"yes_no", "animals"} and "ridge_base-mean" in result["summary"]
    assert set(json.loads(path.read_text())["animals"]["base-mean"]) == {"capitals", "colours", "currencies"}
    return path


def test_library_ce(tiny, library, coefficients, tmp_path):
    from research import library_ce

    recon = ckpt.save(tiny.t2l, tmp_path / "recon")
    args = ["--library", str(library), "--recon", str(recon), "--coefficients", str(coefficients)]
    average = library_ce.main([*args, "--examples", "2", "--threads", "1", "--out", str(tmp_path / "ce.json")])
    assert set(average) == {"zero", "library_mean", "recon", "shipped", "own_fit", "ridge_base-mean"}


def test_ridge_task_metric(tiny, library, coefficients, tmp_path):
    from research import ridge_task_metric

    out = tmp_path / "ridge.json"
    args = ["--library", str(library), "--coefficients", str(coefficients), "--encoder", "base-mean"]
    args += ["--rank", "4", "--mc-examples", "1", "--gen-examples", "1", "--max-new-tokens", "2", "--threads", "1"]
    ridge_task_metric.main([*args, "--out", str(out)])
    assert set(json.loads(out.read_text())["summary"]["retained_energy"]) == {"yes_no", "animals"}


def test_adapter_diversity(tiny, monkeypatch, tmp_path):
    from research import adapter_diversity

    items = [EvalItem(p, qas[0][0], [qas[0][1]], "made-up") for p, qas in PASSAGES]
    monkeypatch.setattr(adapter_diversity, "d2l_eval_items", lambda **k: items)
    result = adapter_diversity.main(["tiny"], out=str(tmp_path / "diversity.json"))
    assert result["tiny"]["docs"] == 3 and -1.0 <= result["tiny"]["pairwise_cosine_mean"] <= 1.0


def test_long_document_scaling(tiny, monkeypatch, tmp_path):
    from research import long_document_scaling

    text = " ".join(p for p, _ in PASSAGES) * 4  # a few 64-token chunks
    doc = Document("d0", 256, text, tiny.count_tokens(text), [Question("q0", "Who grows pears?", ["Mirelle"], "x")])
    monkeypatch.setattr(long_document_scaling, "load_pool", lambda seed: [])
    monkeypatch.setattr(long_document_scaling, "build_documents", lambda *a, **k: {256: [doc]})
    out = tmp_path / "long.json"
    long_document_scaling.main(["--plan", "256:1x1", "--out", str(out)])
    means = json.loads(out.read_text())["mean_nll"]["256"]
    assert means["chunks"] > 1 and {"concat_unscaled", "shipped_trained_over_n", "bm25_top_chunk"} <= set(means)


def test_calibrate_skill_threshold(tmp_path):
    from research import calibrate_skill_threshold

    out = tmp_path / "threshold.json"
    result = calibrate_skill_threshold.main(["--tiny", "--routers", "model", "--out", str(out)])
    assert 0.0 <= result["routers"]["model"]["auc_in_vs_out"] <= 1.0 and out.exists()


def test_probe_consolidation_speed(tiny, capsys):
    from research import probe_consolidation_speed

    probe_consolidation_speed.main(
        ["--threads", "1", "--tokens", "512", "--steps", "1", "--variants", "default,layers=none", "--questions"]
    )
    out = capsys.readouterr().out
    assert "default" in out and "layers=none" in out and '"hits"' in out and out.count('"nll"') == 4


def test_probe_teacher_speed(tiny, capsys):
    from research import probe_teacher_speed

    probe_teacher_speed.main(["--threads", "1"])
    out = capsys.readouterr().out
    assert "left_padded_16" in out and "shared_prefix_64" in out and '"same_tokens"' in out


def test_probe_skill_teacher(tiny, monkeypatch):
    from hyperlora_integrations.consolidation.skill import SkillConsolidationConfig
    from research import probe_skill_teacher

    tiny_recipe = SkillConsolidationConfig(pools={"words": 2}, ranked=2, max_new_tokens=2)
    tiny_recipe.training.steps = 1
    real = probe_skill_teacher.consolidate_skill
    monkeypatch.setattr(
        probe_skill_teacher, "consolidate_skill", lambda *a, **k: real(*a, **(k | {"config": tiny_recipe}))
    )
    result = probe_skill_teacher.main(["--threads", "1", "--max-new-tokens", "2"])
    assert result["all"]["questions"] == sum(v["questions"] for v in result["tasks"].values()) > 0
    assert all(
        0 <= v[k] <= v["questions"] for v in result["tasks"].values() for k in ("desc", "teacher", "consolidated")
    )
    frames = probe_skill_teacher.main(["--threads", "1", "--teacher-frames", "1,2"])["frames"]
    assert set(frames) == {1, 2} and set(frames[1]) == set(result["tasks"])
    selected = probe_skill_teacher.main(["--threads", "1", "--max-new-tokens", "2", "--select-confident", "2"])
    assert set(selected["selected"]) == set(result["tasks"])
    from hyperlora_integrations.consolidation import skill, skill_targets

    assert skill.pool_inputs is skill_targets.pool_inputs  # the probe put the real one back


def test_warm_start_steps(tiny, tmp_path):
    from research import warm_start_steps

    out = tmp_path / "warm.json"
    result = warm_start_steps.main(["--limit", "2", "--steps", "1,2", "--out", str(out)])
    assert {"zero@1", "instant@2", "instant_minus_zero@2"} <= set(result["summary"]) and len(result["rows"]) == 2
    assert json.loads(out.read_text())["summary"]["zero@2"]["gap_closure"]["n"] == 2
    assert result["summary"]["instant@1"]["own_minus_mismatched"]["n"] == 2


def test_research_is_not_imported_by_the_package():
    import subprocess

    code = "import hyperlora_integrations, hyperlora_integrations.cli, hyperlora_integrations.training.train_t2l, sys\n"
    code += "assert not [m for m in sys.modules if m.split('.')[0] == 'research'], 'research imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_consolidated_library_feeds_the_neighbour_test(tiny, monkeypatch, tmp_path):
    """Consolidated skills, one per paraphrase and one per held-out task, resumable; the
    neighbour test takes the entries by their own records and groups the paraphrases."""
    from research import consolidated_library, library_neighbours

    paraphrases = [
        Task(f"family/capitals#{d}", "gen", [text], TRAIN[0].examples) for d, text in enumerate(TRAIN[0].descriptions)
    ]
    other = Task("family/colours#0", "gen", TRAIN[2].descriptions[:1], TRAIN[2].examples)
    held = Task("family/animals", "gen", HELD[1].descriptions[:1], HELD[1].examples)
    rows = [(t, "train") for t in [*paraphrases, other]] + [(held, "held")]
    monkeypatch.setattr(consolidated_library, "entries", lambda words, seed=0: rows)
    folder = tmp_path / "consolidated"
    consolidated_library.main(["--out", str(folder), "--shard", "0/2"])
    assert len(load_library(folder, "train")) == 2  # every other entry
    consolidated_library.main(["--out", str(folder)])  # the rest; the first two are kept
    train, held_lib = load_library(folder, "train"), load_library(folder, "held")
    assert set(train) == {t.name for t in [*paraphrases, other]} and set(held_lib) == {"family/animals"}
    adapter, info = train["family/capitals#1"]
    assert info["descriptions"] == [TRAIN[0].descriptions[1]] and info["loss_last"] is not None
    assert adapter.metadata.description == TRAIN[0].descriptions[1]

    monkeypatch.setattr(library_neighbours, "ENCODERS", ("base-mean",))
    result = library_neighbours.main(["--library", str(folder), "--weighted"])
    assert set(result["tasks"]) == {"family/animals"}
    assert result["paraphrases"]["entries"] == 3  # the capitals paraphrases; colours has no sibling
