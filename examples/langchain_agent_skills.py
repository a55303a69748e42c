"""An agent that gains skills by description: ``skill_tool`` in a tool loop and in LangChain's agent.

Each skill is one sentence of plain language; Text-to-LoRA turns it into an adapter once, and
``skill_tool`` wraps it as a tool that answers its ``input`` with that adapter active (for that
call only). The tool calls are made by the local model itself: ``ChatHyperLoRA.bind_tools``
decodes calls under a grammar built from the tools, so each call names a real tool with valid
arguments.

1. An explicit tool loop: the first turn is bound with ``tool_choice="any"`` (a call is
   forced; the model chooses the skill and writes its input), the skills run, and the model
   answers from their results.
2. The same tools in LangChain's agent constructor (``langchain.agents.create_agent`` when
   ``langchain`` is installed, else LangGraph's ``create_react_agent``), where the model decides
   by itself whether to call (``tool_choice`` auto): a 135M model often answers directly.
3. The same skills without tools: ``auto_skill=True`` routes each request by description.

    python examples/langchain_agent_skills.py          # default model (needs a Text-to-LoRA checkpoint)
    python examples/langchain_agent_skills.py --tiny   # tiny random model: runs in seconds, gibberish
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from _models import add_model_args, load_model
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

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
    parser.add_argument("--max-tokens", type=int, default=None, help="per model call (default 96, 64 with --tiny)")
    args = parser.parse_args(argv)
    model = load_model(args, need=("t2l",))
    max_tokens = args.max_tokens or (64 if args.tiny else 96)

    llm = ChatHyperLoRA(model=model, max_tokens=max_tokens)
    tools = [skill_tool(llm, name, description) for name, description in SKILLS.items()]
    by_name = {t.name: t for t in tools}

    for task in TASKS:
        messages = [SystemMessage(SYSTEM), HumanMessage(task)]
        call_turn = llm.bind_tools(tools, tool_choice="any").invoke(messages)
        results = [by_name[c["name"]].invoke(c) for c in call_turn.tool_calls]  # ToolMessages
        answer = llm.bind_tools(tools).invoke([*messages, call_turn, *results])
        print(f"[loop] task: {task}")
        for c, r in zip(call_turn.tool_calls, results, strict=True):
            print(f"    called {c['name']}({c['args']}) -> {r.content.strip()[:200]!r}")
        print(f"    answer: {answer.text.strip()!r} (further calls: {[c['name'] for c in answer.tool_calls]})")

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
        print(f"[tool] {tool.name}: {tool.invoke({'input': task}).strip()!r}")

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
