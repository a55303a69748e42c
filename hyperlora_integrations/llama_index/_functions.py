"""Function calling for ``HyperLoRALLM``: LlamaIndex tools in, ``ToolSelection``s out.

The tool-call format is the core's (``toolcalls.py``): tool schemas rendered into the system
prompt and decoding constrained to ``<tool_call>[{"name": ..., "arguments": ...}]</tool_call>``
by the grammar built from the tools (``constrained.py``). With ``tool_required`` (what
``structured_predict``/``as_structured_llm`` and ``FunctionCallingProgram`` use) a call is forced;
otherwise the model answers in text or calls a tool, and ``FunctionAgent`` loops on the calls.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.llms.llm import ToolSelection

from ..errors import InvalidInputError
from ..toolcalls import ParseResult, ToolSpec, render_calls


def tool_spec(tool: Any) -> ToolSpec:
    """A LlamaIndex tool (``BaseTool``) or an OpenAI-style tool dict as the core's ``ToolSpec``."""
    if isinstance(tool, dict):
        fn = tool.get("function", tool)
        return ToolSpec(fn["name"], fn.get("description", ""), fn.get("parameters") or {"type": "object"})
    metadata = getattr(tool, "metadata", None)
    if metadata is None:
        raise InvalidInputError(f"tools must be LlamaIndex tools or OpenAI-style dicts, got {type(tool).__name__}")
    fn = metadata.to_openai_tool()["function"]
    return ToolSpec(fn["name"], fn.get("description", ""), fn.get("parameters") or {"type": "object"})


def prepare_chat_with_tools(
    tools: Sequence[Any],
    user_msg: str | ChatMessage | None = None,
    chat_history: list[ChatMessage] | None = None,
    allow_parallel_tool_calls: bool = False,
    tool_required: bool = False,
    tool_choice: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The ``chat`` keyword arguments of one ``chat_with_tools`` call."""
    messages = list(chat_history or [])
    if user_msg is not None:
        messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg)
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or tool_choice).get("name")
    if tool_choice in ("auto", None):
        tool_choice = None
    elif tool_choice in ("required", True):
        tool_choice = "any"
    if tool_required and tool_choice is None:
        tool_choice = "any"
    return {
        "messages": messages,
        "tools": [tool_spec(t) for t in tools] if tools else [],
        "tool_choice": tool_choice,
        "parallel_tool_calls": allow_parallel_tool_calls,
        **kwargs,
    }


def tool_message_content(message: ChatMessage, text: str) -> str:
    """An assistant turn's text plus its past tool calls, in the format the model emits."""
    calls = [
        {"name": b.tool_name, "args": _as_dict(b.tool_kwargs)} for b in message.blocks if isinstance(b, ToolCallBlock)
    ]
    if not calls:
        for raw in message.additional_kwargs.get("tool_calls") or []:
            fn = raw.get("function", raw) if isinstance(raw, dict) else {}
            if "name" in fn:
                calls.append({"name": fn["name"], "args": _as_dict(fn.get("arguments", {}))})
    if not calls:
        return text
    rendered = render_calls(calls)
    return f"{text}\n{rendered}" if text.strip() else rendered


def _as_dict(kwargs: Any) -> dict[str, Any]:
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except ValueError:
            return {}
    return kwargs if isinstance(kwargs, dict) else {}


def response_message(text: str, parsed: ParseResult | None, parallel: bool) -> ChatMessage:
    """The assistant message of a finished call: its text and one ``ToolCallBlock`` per call.

    The calls are also listed OpenAI-style in ``additional_kwargs["tool_calls"]``, where older
    LlamaIndex code looks for them.
    """
    if parsed is None or not parsed.calls:
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)
    calls = parsed.calls if parallel else parsed.calls[:1]
    ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in calls]
    blocks: list[Any] = [TextBlock(text=parsed.content)] if parsed.content else []
    blocks += [ToolCallBlock(tool_call_id=i, tool_name=c.name, tool_kwargs=c.arguments) for i, c in zip(ids, calls)]
    openai_style = [
        {"id": i, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for i, c in zip(ids, calls)
    ]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs={"tool_calls": openai_style})


def tool_calls_of(response: ChatResponse, error_on_no_tool_call: bool = True) -> list[ToolSelection]:
    """The ``ToolSelection``s in a response made by ``response_message``."""
    selections = [
        ToolSelection(tool_id=b.tool_call_id or b.tool_name, tool_name=b.tool_name, tool_kwargs=_as_dict(b.tool_kwargs))
        for b in response.message.blocks
        if isinstance(b, ToolCallBlock)
    ]
    if not selections and error_on_no_tool_call:
        raise ValueError(f"expected at least one tool call, got the text {response.message.content!r}")
    return selections
