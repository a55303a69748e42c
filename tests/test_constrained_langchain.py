"""ChatHyperLoRA tool calling and structured output under constrained decoding (tiny model).

The random model writes nonsense values, so these tests check what the grammar guarantees:
forced calls name bound tools with schema-valid arguments, and structured output parses.
"""

from __future__ import annotations

from typing import Annotated, TypedDict

import pytest
import torch
from conftest import make_tiny_model
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from hyperlora_integrations.langchain import ChatHyperLoRA

torch.set_num_threads(1)


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return "sunny"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person."""

    name: str = Field(description="full name")
    age: int
    nickname: str | None = None


class PersonDict(TypedDict):
    """A person."""

    name: Annotated[str, ..., "full name"]
    age: int


@pytest.fixture(scope="module")
def llm():
    return ChatHyperLoRA(model=make_tiny_model(), max_tokens=48)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_parses_on_a_random_model(llm, method):
    result = llm.with_structured_output(Person, method=method).invoke("Who is Ada?")
    assert isinstance(result, Person)
    as_dict = llm.with_structured_output(PersonDict, method=method).invoke("Who is Ada?")
    assert set(as_dict) == {"name", "age"} and isinstance(as_dict["age"], int)


def test_include_raw_reports_raw_parsed_and_no_error(llm):
    out = llm.with_structured_output(Person, include_raw=True).invoke("Who?")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Person) and out["parsing_error"] is None


def test_streamed_structured_output_ends_complete(llm):
    chunks = list(llm.with_structured_output(Person.model_json_schema()).stream("Who?"))
    assert chunks and {"name", "age"} <= set(chunks[-1])


@pytest.mark.parametrize("choice", ["any", "add"])
def test_forced_tool_choice_always_calls(llm, choice):
    for seed in range(3):
        msg = llm.bind_tools([get_weather, add], tool_choice=choice).invoke("2 + 3?", temperature=1.0, seed=seed)
        assert msg.tool_calls and msg.response_metadata["finish_reason"] == "tool_calls"
        for call in msg.tool_calls:
            assert choice == "any" or call["name"] == choice
            expected = {"a", "b"} if call["name"] == "add" else {"city"}
            assert set(call["args"]) == expected


def test_parallel_tool_calls_false_gives_one_call(llm):
    bound = llm.bind_tools([get_weather, add], tool_choice="any", parallel_tool_calls=False)
    for seed in range(3):
        assert len(bound.invoke("x", temperature=1.0, seed=seed).tool_calls) == 1


def test_grammar_options_reach_the_core(llm, monkeypatch):
    seen = {}
    real = llm.model.stream_chunks

    def spy(prompt, adapters=(), **kwargs):
        seen.update(kwargs)
        return real(prompt, adapters, **kwargs)

    monkeypatch.setattr(llm.model, "stream_chunks", spy)
    llm.bind_tools([add], tool_choice="add").invoke("x")
    assert seen["tool_choice"] == "add" and seen["tools"][0]["name"] == "add"
    seen.clear()
    llm.with_structured_output(Person, method="json_mode").invoke("x")
    assert seen["json_schema"]["properties"].keys() == {"name", "age", "nickname"}
    seen.clear()
    llm.bind(response_format={"type": "json_object"}).invoke("x")
    assert seen["json_schema"] == {"type": "object"}


def test_tools_and_response_format_together_are_refused(llm):
    with pytest.raises(ValueError, match="response_format"):
        llm.bind_tools([add]).bind(response_format={"type": "json_object"}).invoke("x")
