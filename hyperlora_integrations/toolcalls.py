"""Tool calling for a chat template without native tool support: render schemas, parse calls.

Shared by the LangChain and LlamaIndex integrations (no framework import).

Pure Python (no LangChain import) so it can be tested on strings alone. The format is the
``<tools>`` / ``<tool_call>`` convention many small instruction-tuned models (SmolLM2 among
them) saw in training: the schemas go into the system prompt as JSON and the model answers
``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>``.

The schemas in the prompt tell the model *what* to call; ``grammar_options`` turns the same tools
(or a ``response_format``) into the grammar that decoding is constrained to (``constrained.py``),
so a call that is started is a well-formed call of a bound tool with schema-valid arguments, and
a forced ``tool_choice`` always yields one.

Parsing never raises: anything that is not a well-formed call of a bound tool is left as plain
text (which only a caller's own scripted or unconstrained output can still produce).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_BLOCK_RE = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)
_FENCE_RE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)


@dataclass
class ToolSpec:
    """One bound tool as the model sees it."""

    name: str
    description: str
    parameters: dict[str, Any]

    def as_prompt_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParseResult:
    """``calls`` is empty when the output held no valid call; ``content`` is the remaining text."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)
    error: str | None = None  # why a call-shaped output was kept as text


def render_tools(tools: Sequence[ToolSpec], choice: str | None) -> str:
    """The system-prompt block that describes ``tools`` and how to call them.

    ``choice`` is ``None``/"auto" (model decides), "any" (must call some tool) or a tool name.
    The instruction says what to do; ``grammar_options`` makes decoding obey it.
    """
    schemas = json.dumps([t.as_prompt_json() for t in tools], ensure_ascii=False)
    lines = [
        "You have access to the following tools, described by JSON schemas:",
        f"<tools>{schemas}</tools>",
        "To call tools, reply with only this, and nothing else:",
        f'{OPEN}[{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}]{CLOSE}',
    ]
    if choice == "any":
        lines.append("You must call at least one of the tools.")
    elif choice:
        lines.append(f'You must call the tool "{choice}".')
    else:
        lines.append("If no tool is needed, answer the user directly in plain text.")
    return "\n".join(lines)


def _response_schema(response_format: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema a ``response_format`` asks for (``{"type": "object"}`` for bare JSON mode).

    Accepts our own ``{"type": "json_schema" | "json_mode", "schema": ...}`` and OpenAI's
    ``{"type": "json_object"}`` and ``{"type": "json_schema", "json_schema": {"schema": ...}}``.
    """
    kind = response_format.get("type")
    if kind not in ("json_schema", "json_mode", "json_object"):
        raise ValueError(f"response_format type {kind!r}: use json_schema, json_mode or json_object")
    schema = response_format.get("schema")
    if schema is None and isinstance(response_format.get("json_schema"), Mapping):
        schema = response_format["json_schema"].get("schema")
    if kind == "json_schema" and not schema:
        raise ValueError("response_format type 'json_schema' needs a schema")
    return dict(schema) if schema else {"type": "object"}


def grammar_options(
    tools: Sequence[ToolSpec],
    choice: str | None,
    parallel: bool,
    response_format: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``HyperLoRAModel.stream_chunks`` options that constrain one chat call's decoding.

    Bound tools give the tool-call grammar (plain text stays possible unless ``choice`` forces a
    call); a ``response_format`` gives its JSON schema, in JSON mode too when a schema is given,
    since the parser would reject any other object. Both at once is ambiguous and refused.
    """
    if tools and response_format:
        raise ValueError(
            "a call cannot both bind tools and set response_format: use with_structured_output("
            "method='function_calling') for a tool-shaped answer, or unbind the tools"
        )
    if tools:
        return {
            "tools": [{"name": t.name, "parameters": t.parameters} for t in tools],
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
        }
    if response_format:
        return {"json_schema": _response_schema(response_format)}
    return {}


def render_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant turn's past tool calls, in the same format the model is asked to emit."""
    payload = [{"name": c["name"], "arguments": c.get("args", {})} for c in calls]
    return f"{OPEN}{json.dumps(payload, ensure_ascii=False)}{CLOSE}"


def _loads(text: str) -> Any:
    text = text.strip()
    fenced = _FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1)
    return json.loads(text)


def _calls_from(obj: Any, names: set[str]) -> list[ParsedCall]:
    """Validate decoded JSON as one call or a list of calls; raise ValueError otherwise."""
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise ValueError("empty tool-call list")
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("a tool call needs a string 'name'")
        if item["name"] not in names:
            raise ValueError(f"unknown tool {item['name']!r}")
        args = next((item[k] for k in ("arguments", "parameters", "args") if k in item), {})
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError("tool arguments must be a JSON object")
        calls.append(ParsedCall(item["name"], args))
    return calls


def parse_tool_calls(text: str, tool_names: Sequence[str]) -> ParseResult:
    """Split ``text`` into plain content and calls of the tools named ``tool_names``.

    Accepted: one or more ``<tool_call>`` blocks (a missing closing tag at the very end is
    tolerated, as generation may stop there), or an output that is nothing but a JSON call
    (optionally in a code fence). If any block is malformed or names an unknown tool, the
    whole output is returned unchanged as content: half-parsed calls would be worse than none.
    """
    names = set(tool_names)
    if not names or not text:
        return ParseResult(text)
    if OPEN in text:
        calls: list[ParsedCall] = []
        try:
            for match in _BLOCK_RE.finditer(text):
                calls += _calls_from(_loads(match.group(1)), names)
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            return ParseResult(text, error=f"malformed tool call: {exc}")
        content = _BLOCK_RE.sub("", text)
        return ParseResult(content if content.strip() else "", calls)
    stripped = text.strip()
    if stripped and stripped[0] in "{[`":
        try:
            return ParseResult("", _calls_from(_loads(stripped), names))
        except (ValueError, TypeError):
            return ParseResult(text)  # ordinary JSON or code: not a call, and not an error
    return ParseResult(text)


class StreamFilter:
    """Holds back streamed text that may turn out to be a tool call.

    Text before a ``<tool_call>`` tag streams through as it comes; from the tag on (or from the
    start, if the output opens like bare JSON) it is held until the end, when ``finish`` parses
    it. Because ``feed`` only ever releases a prefix of what ``parse_tool_calls`` would keep as
    content, streaming and ``invoke`` produce the same message.
    """

    def __init__(self, tool_names: Sequence[str]) -> None:
        self.names = list(tool_names)
        self.buffer = ""
        self.released = 0
        self.holding = False

    def feed(self, text: str) -> str:
        self.buffer += text
        if not self.names:
            return self._release(len(self.buffer))
        if self.holding:
            return ""
        body = self.buffer[self.released :]
        if self.released == 0:
            head = body.lstrip()
            if head[:1] in ("{", "[", "`"):  # may be a bare JSON call: hold it all
                self.holding = True
                return ""
        at = body.find(OPEN)
        if at >= 0:
            self.holding = True
            return self._release(self.released + at)
        hold = 0
        for k in range(min(len(OPEN) - 1, len(body)), 0, -1):
            if body.endswith(OPEN[:k]):
                hold = k
                break
        return self._release(len(self.buffer) - hold)

    def _release(self, end: int) -> str:
        out = self.buffer[self.released : end]
        if self.names:
            # Trailing whitespace is held too: it may turn out to sit before a tool call, and an
            # answer that is only whitespace plus a call must end up with empty content.
            out = out.rstrip()
        self.released += len(out)
        return out

    def finish(self) -> tuple[str, ParseResult]:
        """(text still to emit, parse of the whole output)."""
        result = parse_tool_calls(self.buffer, self.names)
        if result.calls:
            return result.content[self.released :], result
        return self.buffer[self.released :], result
