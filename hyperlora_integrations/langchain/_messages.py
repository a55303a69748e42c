"""LangChain messages -> the core's ``{"role", "content"}`` dicts.

The base model is text-only and its chat template knows four roles, so everything is reduced to
text: past tool calls are rendered in the same ``<tool_call>`` format the model is asked to
emit, and tool results become ``tool`` turns that name the tool they answer. Content a text
model cannot read (images, audio, files) is refused with a clear error rather than silently
dropped, so a caller never gets an answer to a question the model did not see.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from ..errors import InvalidInputError
from ._toolcalls import render_calls

# Blocks that carry no text for the model: tool calls are rendered from ``tool_calls``,
# reasoning is the model's own scratch work from an earlier turn.
_SKIPPED_BLOCKS = {"tool_use", "tool_call", "tool_call_chunk", "function_call", "reasoning", "thinking"}
_ROLE_ALIASES = {"human": "user", "ai": "assistant", "developer": "system", "function": "tool"}


def content_text(content: str | list[Any], *, where: str) -> str:
    """The text of a message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise InvalidInputError(
                f"{where}: content block of type {kind!r} is not supported: this model reads text only"
            )
    return "".join(parts)


def to_core_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """Convert a LangChain message list into core chat messages."""
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"message {i} ({message.type})"
        text = content_text(message.content, where=where)
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            calls = [dict(c) for c in message.tool_calls]
            if calls:
                text = f"{text}\n{render_calls(calls)}" if text.strip() else render_calls(calls)
            out.append({"role": "assistant", "content": text})
        elif isinstance(message, ToolMessage):
            payload = {"name": message.name, "tool_call_id": message.tool_call_id, "content": text}
            if message.status == "error":
                payload["status"] = "error"
            out.append({"role": "tool", "content": json.dumps(payload, ensure_ascii=False)})
        elif isinstance(message, FunctionMessage):
            payload = {"name": message.name, "content": text}
            out.append({"role": "tool", "content": json.dumps(payload, ensure_ascii=False)})
        elif isinstance(message, ChatMessage):
            role = _ROLE_ALIASES.get(message.role, message.role)
            if role not in {"system", "user", "assistant", "tool"}:
                raise InvalidInputError(f"{where}: unsupported role {message.role!r}")
            out.append({"role": role, "content": text})
        else:
            raise InvalidInputError(f"{where}: unsupported message type {type(message).__name__}")
    if not out:
        raise InvalidInputError("no messages to answer")
    return out
