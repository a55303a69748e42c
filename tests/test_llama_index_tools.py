"""Skill tools on the tiny model, alone and inside LlamaIndex's workflow ``ReActAgent``.

The tiny model cannot reason, so the agent's reasoning LLM here is a scripted one that follows
the ReAct format (call the tool once, then answer with what it observed). The tool itself is the
real thing: ``HyperLoRALLM`` on the tiny model with the generated skill adapter active, which
the recorder checks at every forward pass.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_index_support import ActiveLoRARecorder

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import ReActAgent, ToolCallResult  # noqa: E402
from llama_index.core.base.llms.types import (  # noqa: E402
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field  # noqa: E402
from llama_index.core.llms.callbacks import llm_completion_callback  # noqa: E402
from llama_index.core.llms.custom import CustomLLM  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from hyperlora_integrations.errors import InvalidInputError  # noqa: E402
from hyperlora_integrations.llama_index import HyperLoRALLM, skill_tool  # noqa: E402
from hyperlora_integrations.skills import SkillLibrary  # noqa: E402

SAMPLING = {"max_new_tokens": 5, "temperature": 1.0, "seed": 5}
DESCRIPTION = "Rewrite the input as a formal business letter."


class ScriptedReActLLM(CustomLLM):
    """Emits ReAct steps: first an Action on ``tool_name``, then an Answer quoting the observation."""

    tool_name: str
    tool_input: str
    prompts: list[str] = Field(default_factory=list)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="scripted-react", is_chat_model=False)

    def _step(self, prompt: str) -> str:
        self.prompts.append(prompt)
        marker = "\nuser: Observation: "  # an observation turn (the format help also says "Observation:")
        if marker in prompt:
            observation = prompt.rsplit(marker, 1)[1].rsplit("\nassistant:", 1)[0].strip()
            return f"Thought: I can answer without using any more tools.\nAnswer: {observation}"
        return (
            "Thought: I need to use a tool to help me answer the question.\n"
            f"Action: {self.tool_name}\nAction Input: {json.dumps({'input': self.tool_input})}"
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._step(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text = self._step(prompt)
        yield CompletionResponse(text=text, delta=text)


@pytest.fixture()
def llm(tiny_model):
    return HyperLoRALLM(tiny_model)


def test_skill_tool_is_a_function_tool_running_the_skill(llm, tiny_model):
    tool = skill_tool(llm, "formalize", DESCRIPTION, **SAMPLING)
    assert isinstance(tool, FunctionTool)
    assert tool.metadata.name == "formalize"
    assert tool.metadata.description == DESCRIPTION
    assert list(tool.metadata.get_parameters_dict()["properties"]) == ["input"]
    assert tool.adapter.kind == "skill" and tool.adapter.metadata.description == DESCRIPTION

    with ActiveLoRARecorder(tiny_model) as rec:
        output = tool.call(input="hey, send me the invoice")
    rec.assert_exactly([tool.adapter])
    expected = tiny_model.generate("hey, send me the invoice", [tool.adapter], **SAMPLING)
    assert output.content == expected
    # The skill really changes the model (its sampled words may coincide on a random tiny model).
    assert tiny_model.score("hey", expected, [tool.adapter]) != tiny_model.score("hey", expected)


async def test_skill_tool_async_call(llm, tiny_model):
    tool = skill_tool(llm, "formalize", DESCRIPTION, **SAMPLING)
    with ActiveLoRARecorder(tiny_model) as rec:
        output = await tool.acall(input="hey, send me the invoice")
    rec.assert_exactly([tool.adapter])
    assert output.content == tiny_model.generate("hey, send me the invoice", [tool.adapter], **SAMPLING)


def test_skill_library_persists_and_reuses(llm, tiny_model, monkeypatch):
    library = SkillLibrary(tiny_model)
    first = skill_tool(llm, "formalize", DESCRIPTION, library=library)
    assert library.get("formalize").adapter.id == first.adapter.id

    def fail(description):
        raise AssertionError("skill regenerated")

    monkeypatch.setattr(tiny_model, "generate_skill", fail)
    again = skill_tool(llm, "formalize", DESCRIPTION, library=library)
    assert again.adapter.id == first.adapter.id
    monkeypatch.undo()
    changed = skill_tool(llm, "formalize", "Rewrite the input as a haiku.", library=library)
    assert changed.adapter.id != first.adapter.id
    assert library.get("formalize").description == "Rewrite the input as a haiku."


def test_bad_arguments(llm):
    with pytest.raises(InvalidInputError):
        skill_tool(llm, "has space", DESCRIPTION)
    with pytest.raises(InvalidInputError):
        skill_tool(llm, "ok", "   ")
    with pytest.raises(InvalidInputError):
        skill_tool("not an llm", "ok", DESCRIPTION)


async def test_skill_tool_in_react_agent_loop(llm, tiny_model):
    formal = skill_tool(llm, "formalize", DESCRIPTION, **SAMPLING)
    other = skill_tool(llm, "haiku", "Rewrite the input as a haiku.", **SAMPLING)
    request = "hey, send me the invoice"
    reasoner = ScriptedReActLLM(tool_name="formalize", tool_input=request)
    agent = ReActAgent(tools=[formal, other], llm=reasoner)

    with ActiveLoRARecorder(tiny_model) as rec:
        handler = agent.run(user_msg=f"Make this formal: {request}")
        results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
        final = await handler
    rec.assert_exactly([formal.adapter])  # only the chosen skill ran, and only with its adapter

    expected = tiny_model.generate(request, [formal.adapter], **SAMPLING)
    assert len(results) == 1
    assert results[0].tool_name == "formalize" and results[0].tool_kwargs == {"input": request}
    assert results[0].tool_output.content == expected
    # The agent saw both tools described, and its second step saw the skill's output.
    assert "formalize" in reasoner.prompts[0] and "haiku" in reasoner.prompts[0]
    assert f"Observation: {expected}" in reasoner.prompts[1]
    assert str(final.response.content).strip() == expected.strip()
