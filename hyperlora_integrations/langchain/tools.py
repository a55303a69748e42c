"""``skill_tool``: a LangChain tool that runs the model with a Text-to-LoRA skill adapter.

An agent gains a skill by description: the description is turned into an adapter once, when the
tool is made, and every call of the tool answers its ``input`` with that adapter active (and only
for that call; the agent's own turns run without it). The arguments and the tool's one argument
name are those of the LlamaIndex ``skill_tool``.
"""

from __future__ import annotations

import re
from typing import Any

from .._optional import require

require("langchain_core", "langchain")

from langchain_core.tools import BaseTool, StructuredTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from .._arguments import check_tool_generation  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..lora import Adapter  # noqa: E402
from ..skills import Skill, SkillLibrary, tool_skill_adapter  # noqa: E402
from .chat_models import ChatHyperLoRA  # noqa: E402

_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SkillRequest(BaseModel):
    """Arguments of a skill tool: one string, ``input``, as in the LlamaIndex ``skill_tool``."""

    input: str = Field(description="The text or request the skill should be applied to.")


def skill_tool(
    llm: ChatHyperLoRA,
    name: str,
    description: str,
    *,
    skill: str | Adapter | Skill | None = None,
    library: SkillLibrary | None = None,
    tool_description: str | None = None,
    return_direct: bool = False,
    consolidate: bool | str = False,
    **invoke_kwargs: Any,
) -> BaseTool:
    """A tool named ``name`` that answers its ``input`` with the skill ``description`` describes.

    Same arguments as the LlamaIndex ``skill_tool``: ``skill`` overrides what the adapter is made
    from (a different description, a library skill name, a ``Skill`` or an ``Adapter``); by
    default it is generated from ``description``. ``library`` (a ``SkillLibrary``) keeps the
    skill under ``name`` and reuses it while the description is unchanged. ``tool_description``
    is what the agent reads to decide when to call the tool (default: ``description``).
    ``invoke_kwargs`` (for example ``max_tokens``) are passed to each model call and checked now.
    ``consolidate=True`` distils the description into the skill it makes (tens of seconds,
    ``HyperLoRAModel.generate_skill(consolidate=True)``); a consolidated ``Skill`` or
    ``Adapter`` passed as ``skill`` is used as it is.
    """
    if not isinstance(llm, ChatHyperLoRA):
        raise InvalidInputError(f"skill_tool needs a ChatHyperLoRA, got {type(llm).__name__}")
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise InvalidInputError(f"tool name {name!r}: use 1-64 letters, digits, '_' or '-'")
    if not isinstance(description, str) or not description.strip():
        raise InvalidInputError("a skill tool needs a non-empty description")
    check_tool_generation("skill_tool", invoke_kwargs, extra=("timeout",))
    if library is not None or consolidate:
        adapter = tool_skill_adapter(
            llm.model, name, description, skill=skill, library=library, consolidate=consolidate
        )
    else:  # through the chat model: its skills= library names and its per-description cache
        adapter = llm.skill(skill if skill is not None else description)
    skilled = llm.with_skill(adapter)

    def run(input: str) -> str:  # noqa: A002  (the argument name both frameworks' tools use)
        return skilled.invoke(input, **invoke_kwargs).text

    async def arun(input: str) -> str:  # noqa: A002
        return (await skilled.ainvoke(input, **invoke_kwargs)).text

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=tool_description or description,
        args_schema=SkillRequest,
        return_direct=return_direct,
    )
