"""Skills as LlamaIndex tools: a ``FunctionTool`` whose work is done by a generated skill adapter.

``skill_tool(llm, "summarize", "Summarize the text in one sentence.")`` asks Text-to-LoRA for an
adapter from the description and returns a tool that answers its input with that adapter active
on the ``HyperLoRALLM``'s model. Agents (``ReActAgent``, ``FunctionAgent``) see an ordinary tool
with one string argument; the skill costs no prompt tokens, because the description lives in
the adapter rather than in a system prompt.
"""

from __future__ import annotations

import re
from typing import Any

from .._optional import require

require("llama_index.core", "llamaindex")

from llama_index.core.bridge.pydantic import BaseModel, Field, create_model  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from .._arguments import check_tool_generation  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..lora import Adapter  # noqa: E402
from ..skills import Skill, SkillLibrary, tool_skill_adapter  # noqa: E402
from .llms import HyperLoRALLM  # noqa: E402

# Tool names end up in prompts and in function-calling schemas: keep to the portable alphabet.
_TOOL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class SkillTool(FunctionTool):
    """A ``FunctionTool`` that also exposes the skill adapter behind it."""

    skill_name: str
    skill_description: str
    adapter: Adapter


def _schema(name: str) -> type[BaseModel]:
    return create_model(
        name,
        input=(str, Field(description="The text or request the skill should be applied to.")),
    )


def skill_tool(
    llm: HyperLoRALLM,
    name: str,
    description: str,
    *,
    skill: str | Adapter | Skill | None = None,
    library: SkillLibrary | None = None,
    tool_description: str | None = None,
    return_direct: bool = False,
    consolidate: bool | str = False,
    **generation: Any,
) -> SkillTool:
    """A tool that runs ``llm`` with the skill adapter for ``description`` active.

    Same arguments as the LangChain ``skill_tool``: ``skill`` overrides what the adapter is
    made from (a description, a library skill name, a ``Skill`` or an ``Adapter``);
    ``library`` (a core ``SkillLibrary``) persists the skill under ``name`` and reuses it when
    it already holds that name with the same description, so restarts do not regenerate it.
    ``tool_description`` is what the agent reads to choose the tool (defaults to
    ``description``). ``generation`` keyword arguments (``max_new_tokens``, ``temperature``,
    ...) apply to every call of the tool and are checked now, not at the first call.
    ``consolidate=True`` distils the description into the skill it makes (tens of seconds,
    ``HyperLoRAModel.generate_skill(consolidate=True)``); a consolidated ``Skill`` or
    ``Adapter`` passed as ``skill`` is used as it is.
    """
    if not isinstance(llm, HyperLoRALLM):
        raise InvalidInputError(f"llm must be a HyperLoRALLM, got {type(llm).__name__}")
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise InvalidInputError(f"invalid tool name {name!r}: use a letter or '_' then letters, digits, '_', '-'")
    if not isinstance(description, str) or not description.strip():
        raise InvalidInputError("a skill needs a non-empty description")
    check_tool_generation("skill_tool", generation)
    adapter = tool_skill_adapter(
        llm.hyperlora_model, name, description, skill=skill, library=library, consolidate=consolidate
    )

    def run(input: str) -> str:
        return llm.complete(input, adapters=[adapter], **generation).text

    async def arun(input: str) -> str:
        return (await llm.acomplete(input, adapters=[adapter], **generation)).text

    tool = SkillTool.from_defaults(
        fn=run,
        async_fn=arun,
        name=name,
        description=tool_description or description,
        fn_schema=_schema(name),
        return_direct=return_direct,
    )
    tool.skill_name = name
    tool.skill_description = description
    tool.adapter = adapter
    return tool
