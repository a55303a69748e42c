"""The grammar a call's options ask for: JSON schema, regex or tool calls, as Lark text for llguidance.

Kept apart from the decoding machinery in ``constrained.py`` (which compiles these grammars and
masks logits) because building one is plain text work: it needs neither llguidance nor torch, and
its choices are what make the output right, not only parseable. An object schema that leaves
extra keys open is closed (``_closed``), so an object has exactly the keys its schema names; JSON
is compact with ``json.dumps``'s separators (``JSON_OPTIONS``); a tool call is the ``<tool_call>``
block the prompts show, with each tool's arguments under its own schema. ``constrained.py``
re-exports every name.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError
from .toolcalls import CLOSE, OPEN

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""Compact JSON with the separators of ``json.dumps``: what the model sees in its prompts, and no
room for a small model to loop on whitespace."""


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (Lark text); ``describe`` says what it constrains, for errors."""

    lark: str
    describe: str


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists properties and
    leaves extra keys open; every other keyword is kept, so the output still validates against
    the original schema."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def schema_dict(schema: Any) -> dict[str, Any]:
    """A JSON schema as a dict, from a dict, a JSON string or a Pydantic model class."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidInputError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise InvalidInputError(
            f"json_schema must be a dict, a JSON string or a Pydantic model class, got {type(schema).__name__}"
        )
    return dict(schema)


def _json_rule(schema: Mapping[str, Any]) -> str:
    body = _closed(copy.deepcopy(dict(schema)))
    body["x-guidance"] = {**JSON_OPTIONS, **body.get("x-guidance", {})}
    return "%json " + json.dumps(body, ensure_ascii=False)


def json_schema_grammar(schema: Any) -> Grammar:
    """Output is exactly one JSON value valid under ``schema`` (``{}``: any JSON value)."""
    as_dict = schema_dict(schema)
    return Grammar(f"start: value\nvalue: {_json_rule(as_dict)}\n", f"JSON schema {json.dumps(as_dict)[:200]}")


def json_object_grammar() -> Grammar:
    """Output is one JSON object with any keys (JSON mode without a schema)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> Grammar:
    """Output matches ``pattern`` in full (Rust regex syntax, anchored at both ends)."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidInputError("regex must be a non-empty string")
    return Grammar(f"start: VALUE\nVALUE: /{_escape_slashes(pattern)}/\n", f"regex {pattern!r}")


def _escape_slashes(pattern: str) -> str:
    """A regex for a Lark ``/.../`` literal: unescaped slashes escaped, nothing else changed."""
    out, escaped = [], False
    for ch in pattern:
        if ch == "/" and not escaped:
            out.append("\\/")
        else:
            out.append(ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_specs(tools: Iterable[Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, parameters schema)`` of each tool: OpenAI-style ``{"type": "function", "function":
    {...}}`` dicts, ``{"name", "parameters"}`` dicts, or objects with ``name``/``parameters``."""
    specs = []
    for tool in tools:
        if isinstance(tool, Mapping):
            fn = tool.get("function", tool)
            name, params = fn.get("name"), fn.get("parameters")
        else:
            name, params = getattr(tool, "name", None), getattr(tool, "parameters", None)
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"a tool needs a non-empty string name, got {tool!r}")
        if params is None or params == {}:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise InvalidInputError(f"tool {name!r}: parameters must be a JSON schema dict")
        specs.append((name, dict(params)))
    if not specs:
        raise InvalidInputError("tools= needs at least one tool")
    if len({n for n, _ in specs}) != len(specs):
        raise InvalidInputError(f"tool names must be unique, got {[n for n, _ in specs]}")
    return specs


def tool_call_grammar(tools: Iterable[Any], tool_choice: str | None = None, *, parallel: bool = True) -> Grammar:
    """``<tool_call>[{"name": <a bound name>, "arguments": <its schema>}, ...]</tool_call>``.

    ``tool_choice``: ``None``/"auto" (a call or plain text that does not open with the call tag),
    "any"/"required" (a call of some tool), or a tool name (calls of that tool only). Arguments
    are constrained by each tool's own schema; ``parallel=False`` allows exactly one call.
    """
    specs = tool_specs(tools)
    names = [n for n, _ in specs]
    if tool_choice in ("none",):
        raise InvalidInputError("tool_choice='none' means no tools: do not pass tools= at all")
    if tool_choice not in (None, "auto", "any", "required") and tool_choice not in names:
        raise InvalidInputError(f"tool_choice {tool_choice!r} names no bound tool (bound: {names})")
    chosen = specs if tool_choice in (None, "auto", "any", "required") else [s for s in specs if s[0] == tool_choice]
    more = '(", " call)*' if parallel else ""
    lines = [
        f"calls: {_lark_string(OPEN + '[')} call {more} {_lark_string(']' + CLOSE)}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))),
    ]
    for i, (name, params) in enumerate(chosen):
        head = _lark_string('{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ')
        lines.append(f"call_{i}: {head} args_{i} " + _lark_string("}"))
        lines.append(f"args_{i}: {_json_rule(params)}")
    if tool_choice in (None, "auto"):
        # Plain text may not open with the tag: a reply that starts a call must finish a valid one.
        start = ["start: calls | TEXT", r"TEXT: /(?s:.+)/ & ~/(?s:[ \t\r\n]*<tool_call>.*)/"]
    else:
        start = ["start: calls"]
    what = f"tool calls of {[n for n, _ in chosen]} (tool_choice={tool_choice!r})"
    return Grammar("\n".join(start + lines) + "\n", what)


def build_grammar(
    *,
    json_schema: Any = None,
    regex: str | None = None,
    tools: Sequence[Any] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = True,
) -> Grammar | None:
    """The one grammar these call options ask for (``None``: unconstrained)."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("tools", tools)) if v is not None]
    if len(given) > 1:
        raise InvalidInputError(f"pass at most one of json_schema=, regex=, tools= (got {given})")
    if tool_choice is not None and tools is None:
        raise InvalidInputError("tool_choice= needs tools=")
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    if regex is not None:
        return regex_grammar(regex)
    if tools is not None:
        if tool_choice == "none":
            return None
        return tool_call_grammar(tools, tool_choice, parallel=parallel_tool_calls)
    return None
