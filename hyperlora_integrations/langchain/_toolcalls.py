"""The tool-call format, shared with the LlamaIndex integration: it lives in ``..toolcalls``.

Re-exported here because LangChain code and tests import it from this module.
"""

from __future__ import annotations

from ..toolcalls import (
    CLOSE,
    OPEN,
    ParsedCall,
    ParseResult,
    StreamFilter,
    ToolSpec,
    grammar_options,
    parse_tool_calls,
    render_calls,
    render_tools,
)

__all__ = [
    "CLOSE",
    "OPEN",
    "ParseResult",
    "ParsedCall",
    "StreamFilter",
    "ToolSpec",
    "grammar_options",
    "parse_tool_calls",
    "render_calls",
    "render_tools",
]
