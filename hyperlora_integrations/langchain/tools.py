"""``skill_tool``: a LangChain tool that runs the model with a Text-to-LoRA skill adapter.

An agent gains a skill by description: the description is turned into an adapter once, when the
tool is made, and every call of the tool answers its request with that adapter active (and only
for that call; the agent's own turns run without it).
"""

from __future__ import annotations

import re
from typing import Any

from .._optional import require

require("langchain_core", "langchain")

from langchain_core.tools import BaseTool, StructuredTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from ..errors import InvalidInputError  # noqa: E402
from ..lora import Adapter  # noqa: E402
from ..skills import Skill  # noqa: E402
from .chat_models import ChatHyperLoRA  # noqa: E402

_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SkillRequest(BaseModel):
    """Arguments of a skill tool."""

    request: str = Field(description="The task for this skill, including all the text it needs to work on.")


def skill_tool(
    llm: ChatHyperLoRA,
    name: str,
    description: str,
    *,
    skill: str | Adapter | Skill | None = None,
    return_direct: bool = False,
    **invoke_kwargs: Any,
) -> BaseTool:
    """A tool named ``name`` that answers requests with the skill ``description`` describes.

    ``skill`` overrides what the adapter is made from (a different description, a library skill
    name, a ``Skill`` or an ``Adapter``); by default it is generated from ``description``, which
    is also what the agent reads to decide when to call the tool. ``invoke_kwargs`` (for example
    ``max_tokens``) are passed to each model call.
    """
    if not isinstance(llm, ChatHyperLoRA):
        raise InvalidInputError(f"skill_tool needs a ChatHyperLoRA, got {type(llm).__name__}")
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise InvalidInputError(f"tool name {name!r}: use 1-64 letters, digits, '_' or '-'")
    if not isinstance(description, str) or not description.strip():
        raise InvalidInputError("a skill tool needs a non-empty description")
    skilled = llm.with_skill(skill if skill is not None else description)

    def run(request: str) -> str:
        return skilled.invoke(request, **invoke_kwargs).text

    async def arun(request: str) -> str:
        return (await skilled.ainvoke(request, **invoke_kwargs)).text

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=description,
        args_schema=SkillRequest,
        return_direct=return_direct,
    )
