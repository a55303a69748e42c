"""An agent that gains skills by description: ``skill_tool`` with LangChain's agent constructor.

Each skill is one sentence of plain language; Text-to-LoRA turns it into an adapter once, and
``skill_tool`` wraps it as a tool that answers its request with that adapter active (for that call
only). The agent is built with LangChain's current constructor, ``langchain.agents.create_agent``
when the ``langchain`` package is installed, else LangGraph's ``create_react_agent`` (its
predecessor, deprecated in LangGraph 1.0 in favour of ``create_agent``); both take a chat model
with ``bind_tools``, which ``ChatHyperLoRA`` provides.

Then the same skills without an agent: ``ChatHyperLoRA(skills=library, auto_skill=True)`` routes
each request to the best-matching skill by description similarity, and ``with_skill`` pins one.

A 135M model is a weak tool caller: expect it often to answer directly rather than call a tool.
Every tool the agent did call is printed, as is the skill routing.

    python examples/langchain_agent_skills.py          # default model (needs a Text-to-LoRA checkpoint)
    python examples/langchain_agent_skills.py --tiny   # tiny random model: runs in seconds, gibberish
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from _models import add_model_args, load_model
from langchain_core.messages import AIMessage

from hyperlora_integrations.langchain import ChatHyperLoRA, skill_tool
from hyperlora_integrations.skills import SkillLibrary

SKILLS = {
    "translate_to_french": "Translate English text into French.",
    "summarize": "Summarize a text in one short sentence.",
    "write_sql": "Write a SQL query that answers a question about a table named sales(region, month, amount).",
}
TASKS = [
    "Translate into French: The library opens at nine.",
    "Summarize: The council met for three hours and agreed to repair the north bridge before winter.",
    "Write SQL for: total sales amount per region in March.",
]
SYSTEM = "You are a helpful assistant. Use a tool when one fits the request."


def make_agent(llm: ChatHyperLoRA, tools: list[Any]) -> tuple[str, Any]:
    """(constructor name, compiled agent) with the newest constructor available."""
    try:
        from langchain.agents import create_agent
    except ImportError:
        from langgraph.prebuilt import create_react_agent

        with warnings.catch_warnings():  # deprecated in favour of create_agent, which needs `langchain`
            warnings.simplefilter("ignore")
            return "langgraph.prebuilt.create_react_agent", create_react_agent(llm, tools, prompt=SYSTEM)
    return "langchain.agents.create_agent", create_agent(llm, tools=tools, system_prompt=SYSTEM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--max-tokens", type=int, default=None, help="per model call (default 64, 8 with --tiny)")
    args = parser.parse_args(argv)
    model = load_model(args, need=("t2l",))
    max_tokens = args.max_tokens or (8 if args.tiny else 64)

    llm = ChatHyperLoRA(model=model, max_tokens=max_tokens)
    tools = [skill_tool(llm, name, description) for name, description in SKILLS.items()]
    constructor, agent = make_agent(llm, tools)
    print(f"agent built with {constructor}; tools {[t.name for t in tools]}")

    for task in TASKS:
        result = agent.invoke({"messages": [("user", task)]}, config={"recursion_limit": 6})
        calls = [c["name"] for m in result["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
        print(f"[agent] task: {task}")
        print(f"    tools called: {calls}")
        print(f"    answer: {result['messages'][-1].text.strip()!r}")

    # The same skills without an agent: each tool run directly, then routed by description.
    for tool, task in zip(tools, TASKS, strict=True):
        print(f"[tool] {tool.name}: {tool.invoke({'request': task}).strip()!r}")

    library = SkillLibrary(model)
    for name, description in SKILLS.items():
        library.add(name, description)
    router = ChatHyperLoRA(model=model, max_tokens=max_tokens, skills=library, auto_skill=True)
    for task in TASKS:
        message = router.invoke(task)
        skill = message.response_metadata.get("skill")
        ranked = [(name, round(score, 3)) for name, score in library.scores(task)]
        print(f"[routed] {task!r} -> skill {skill['name'] if skill else None} (scores {ranked})")
        print(f"    answer: {message.text.strip()!r}")


if __name__ == "__main__":
    main()
