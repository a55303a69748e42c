"""Grammar-constrained decoding on the tiny random model.

The tiny model's weights are random, so unconstrained it never writes JSON; every valid output
here is the grammar's doing. Sampling at temperature 1 with several seeds walks many different
paths through each grammar, including long strings that only budget-aware closing ends in time.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_model
from transformers import LogitsProcessorList

from hyperlora_integrations.constrained import (
    GrammarLogitsProcessor,
    build_grammar,
    constraint_processor,
    grammar_cache,
    json_schema_grammar,
    tool_call_grammar,
)
from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.toolcalls import parse_tool_calls

jsonschema = pytest.importorskip("jsonschema")
torch.set_num_threads(1)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["friend", "colleague"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city"],
        },
        "nickname": {"type": "string"},
    },
    "required": ["name", "age", "kind", "address"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "magic_function",
            "description": "Apply a magic function.",
            "parameters": {
                "type": "object",
                "properties": {"input": {"type": "integer", "exclusiveMinimum": -1000, "exclusiveMaximum": 1000}},
                "required": ["input"],
            },
        },
    },
    {"name": "no_args", "parameters": {}},
]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [40, 90])
def test_json_schema_output_always_validates(model, seed, budget):
    chunk = model.complete("Describe a person.", json_schema=PERSON, max_new_tokens=budget, temperature=1.0, seed=seed)
    assert chunk.completion_tokens <= budget
    value = json.loads(chunk.text)
    jsonschema.validate(value, PERSON)
    assert set(value) <= set(PERSON["properties"])  # undeclared keys are never generated


def test_json_schema_from_a_pydantic_class(model):
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int
        label: str | None = None

    text = model.generate("A point.", json_schema=Point, max_new_tokens=40, temperature=1.0, seed=3)
    Point.model_validate_json(text)


def test_regex_output_matches_in_full(model):
    pattern = r"[0-9]{3}-[a-z]{2}(!|\?)"
    for seed in range(3):
        text = model.generate("Code?", regex=pattern, max_new_tokens=20, temperature=1.0, seed=seed)
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("choice", ["any", "magic_function", "no_args"])
def test_forced_tool_choice_always_yields_a_valid_call(model, choice):
    for seed in range(3):
        text = model.generate(
            "Use a tool.", tools=TOOLS, tool_choice=choice, max_new_tokens=80, temperature=1.0, seed=seed
        )
        parsed = parse_tool_calls(text, ["magic_function", "no_args"])
        assert parsed.calls and parsed.content == "", text
        for call in parsed.calls:
            assert choice == "any" or call.name == choice
            if call.name == "magic_function":
                assert -1000 < call.arguments["input"] < 1000 and set(call.arguments) == {"input"}
            else:
                assert call.arguments == {}


def test_parallel_false_allows_exactly_one_call(model):
    for seed in range(3):
        text = model.generate(
            "x",
            tools=TOOLS,
            tool_choice="any",
            parallel_tool_calls=False,
            max_new_tokens=80,
            temperature=1.0,
            seed=seed,
        )
        assert len(parse_tool_calls(text, ["magic_function", "no_args"]).calls) == 1


def test_auto_tool_choice_is_text_or_a_valid_call(model):
    grammar = tool_call_grammar(TOOLS, None)
    cache = grammar_cache(model.tokenizer, model._eos_ids)
    ids = model.tokenizer.encode('<tool_call>[{"name": "nope"', add_special_tokens=False)
    matcher = cache.matcher(grammar)
    assert not all(matcher.consume_token(t) for t in ids)  # an unknown tool cannot be started
    matcher = cache.matcher(grammar)
    assert all(matcher.consume_token(t) for t in model.tokenizer.encode("Just text.", add_special_tokens=False))
    for seed in range(3):
        text = model.generate("x", tools=TOOLS, max_new_tokens=40, temperature=1.0, seed=seed)
        parsed = parse_tool_calls(text, ["magic_function", "no_args"])
        assert parsed.calls or not text.lstrip().startswith("<tool_call>")


def test_budget_too_small_for_the_grammar_is_refused(model):
    with pytest.raises(InvalidInputError, match="too small"):
        model.generate("x", tools=TOOLS, tool_choice="magic_function", max_new_tokens=10)


def test_bad_requests_raise_typed_errors(model):
    with pytest.raises(InvalidInputError, match="JSON schema"):
        model.generate("x", json_schema={"type": "objectx"})
    with pytest.raises(InvalidInputError, match="at most one"):
        model.generate("x", json_schema=PERSON, regex="a+")
    with pytest.raises(InvalidInputError, match="needs tools"):
        model.generate("x", tool_choice="any")
    with pytest.raises(InvalidInputError, match="names no bound tool"):
        model.generate("x", tools=TOOLS, tool_choice="other")
    with pytest.raises(InvalidInputError):
        model.generate("x", json_schema="{not json")


def test_rows_of_a_batch_are_matched_independently(model):
    """Two rows through one processor choose what each would choose alone (greedy)."""
    grammar = build_grammar(json_schema=PERSON)
    cache = grammar_cache(model.tokenizer, model._eos_ids)
    prompts = [model.encode("Alice?"), model.encode("Bob?")]
    # Same-length prompts keep the manual loop free of padding: left-trim the longer one.
    prompts = [p[len(p) - min(map(len, prompts)) :] for p in prompts]
    assert prompts[0] != prompts[1]

    def run(rows: list[list[int]], steps: int = 30) -> list[list[int]]:
        proc = GrammarLogitsProcessor(cache, grammar, max_new_tokens=steps)
        ids = torch.tensor(rows)
        outs: list[list[int]] = [[] for _ in rows]
        for _ in range(steps):
            with torch.no_grad():
                logits = model.model(input_ids=ids).logits[:, -1]
            picks = proc(ids, logits).argmax(-1)
            for r, token in enumerate(picks.tolist()):
                outs[r].append(token)
            ids = torch.cat([ids, picks[:, None]], dim=1)
        return outs

    batch = run(prompts)
    assert batch[0] == run([prompts[0]])[0] and batch[1] == run([prompts[1]])[0]


def test_processor_works_in_transformers_generate(model):
    proc = constraint_processor(model.tokenizer, model._eos_ids, json_schema=PERSON, max_new_tokens=60)
    prompt = torch.tensor([model.encode("A person.")])
    out = model.model.generate(
        prompt,
        logits_processor=LogitsProcessorList([proc]),
        max_new_tokens=60,
        do_sample=False,
        eos_token_id=sorted(model._eos_ids),
        pad_token_id=model.tokenizer.pad_token_id,
    )
    text = model.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    jsonschema.validate(json.loads(text), PERSON)


def test_constrained_with_an_adapter_active(model):
    skill = model.generate_skill("Answer with a person's details.")
    text = model.generate("Who?", [skill], json_schema=PERSON, max_new_tokens=60, temperature=1.0, seed=0)
    jsonschema.validate(json.loads(text), PERSON)


def test_compiled_grammars_are_cached(model):
    cache = grammar_cache(model.tokenizer, model._eos_ids)
    assert grammar_cache(model.tokenizer, model._eos_ids) is cache
    grammar = json_schema_grammar({"type": "object", "properties": {"q": {"type": "boolean"}}})
    first = cache.matcher(grammar)
    before = len(cache._prototypes)
    second = cache.matcher(grammar)
    assert len(cache._prototypes) == before and first is not second  # one compile, fresh matchers
