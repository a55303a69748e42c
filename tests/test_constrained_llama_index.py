"""HyperLoRALLM as a LlamaIndex function-calling LLM, on the tiny random model.

The random model picks arbitrary argument values, so these tests check what the grammar
guarantees (a forced call names a bound tool, its arguments fit the tool's schema, structured
output validates) and the plumbing around it (history rendering, streaming, agents).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_tiny_model

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from hyperlora_integrations.llama_index import HyperLoRALLM  # noqa: E402

torch.set_num_threads(1)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


class Song(BaseModel):
    title: str
    year: int


@pytest.fixture(scope="module")
def llm():
    return HyperLoRALLM(make_tiny_model(), max_new_tokens=64)


def test_metadata_says_function_calling(llm):
    assert llm.metadata.is_function_calling_model


def test_forced_call_is_a_valid_call(llm):
    tools = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(shout)]
    for seed in range(3):
        response = llm.chat_with_tools(tools, "What is 2 + 3?", tool_required=True, temperature=1.0, seed=seed)
        calls = llm.get_tool_calls_from_response(response)
        assert calls and calls[0].tool_name in {"add", "shout"}
        for call in calls:
            if call.tool_name == "add":
                assert set(call.tool_kwargs) == {"a", "b"} and all(
                    isinstance(v, int) for v in call.tool_kwargs.values()
                )
            else:
                assert set(call.tool_kwargs) == {"text"}
        assert response.message.additional_kwargs["tool_calls"][0]["function"]["name"] == calls[0].tool_name


def test_named_tool_choice_and_no_parallel_calls(llm):
    tools = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(shout)]
    response = llm.chat_with_tools(tools, "Shout hello", tool_choice="shout", allow_parallel_tool_calls=False)
    calls = llm.get_tool_calls_from_response(response)
    assert [c.tool_name for c in calls] == ["shout"]


def test_predict_and_call_runs_the_tool(llm):
    out = llm.predict_and_call([FunctionTool.from_defaults(add)], "2 + 3?", tool_required=True)
    assert out.sources and out.sources[0].tool_name == "add"
    assert int(out.response) == sum(out.sources[0].raw_input["kwargs"].values())


def test_structured_predict_and_as_structured_llm(llm):
    song = llm.structured_predict(Song, PromptTemplate("A song about {topic}."), topic="cats")
    assert isinstance(song, Song)
    raw = llm.as_structured_llm(Song).chat([ChatMessage(role="user", content="A song.")]).raw
    assert isinstance(raw, Song)


def test_streaming_holds_the_call_back_and_ends_with_it(llm):
    responses = list(llm.stream_chat_with_tools([FunctionTool.from_defaults(add)], "2 + 3?", tool_required=True))
    assert all("<tool_call>" not in (r.delta or "") for r in responses)
    blocks = [b for b in responses[-1].message.blocks if isinstance(b, ToolCallBlock)]
    assert blocks and blocks[0].tool_name == "add"


def test_no_tool_call_is_an_error_only_when_asked(llm):
    response = llm.chat([ChatMessage(role="user", content="hi")])
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError):
        llm.get_tool_calls_from_response(response)


def test_tool_history_is_rendered_for_the_model(llm):
    seen = {}
    real = llm.hyperlora_model.stream_chunks

    def spy(prompt, adapters=(), **kwargs):
        seen["prompt"] = prompt
        return real(prompt, adapters, **kwargs)

    call = ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 2, "b": 3})],
    )
    history = [ChatMessage(role="user", content="2 + 3?"), call, ChatMessage(role="tool", content="5")]
    object.__setattr__(llm.hyperlora_model, "stream_chunks", spy)
    try:
        llm.chat_with_tools([FunctionTool.from_defaults(add)], chat_history=history)
    finally:
        object.__delattr__(llm.hyperlora_model, "stream_chunks")
    prompt = seen["prompt"]
    assert prompt[0]["role"] == "system" and "<tools>" in prompt[0]["content"]
    assert prompt[2] == {
        "role": "assistant",
        "content": '<tool_call>[{"name": "add", "arguments": {"a": 2, "b": 3}}]</tool_call>',
    }
    assert prompt[3] == {"role": "tool", "content": "5"}


def test_function_agent_runs_a_tool_loop(llm):
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(add)], llm=llm, initial_tool_choice="add")

    async def run():
        handler = agent.run("What is 2 + 3?", max_iterations=4)
        results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
        return results, await handler

    results, final = asyncio.run(run())
    assert results and results[0].tool_name == "add"
    assert results[0].tool_output.raw_output == sum(results[0].tool_kwargs.values())
    assert final is not None
