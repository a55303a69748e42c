"""Skills as agent tools: Text-to-LoRA adapters behind LlamaIndex ``FunctionTool``s in a ``FunctionAgent``.

Each skill is a plain-language description turned into a LoRA adapter once (and kept in a
``SkillLibrary``); ``skill_tool`` wraps it as a tool that answers its input with the adapter
active on the local model. No skill instructions occupy the prompt.

The agent's reasoning is done by the same local model: ``HyperLoRALLM`` is a function-calling
LLM whose tool calls are decoded under a grammar built from the tools, so every call it makes
names a real tool with valid arguments. The agent's first step forces a call
(``initial_tool_choice="any"``): the model chooses which skill and writes its input; the
skill runs; the model then answers from the tool's output (or calls again, up to
``--max-iterations``).

    python examples/llamaindex_agent_skills.py          # default model with the shipped Text-to-LoRA checkpoint
    python examples/llamaindex_agent_skills.py --tiny   # tiny random model: runs in seconds, answers meaningless (often '')
"""

from __future__ import annotations

import argparse
import asyncio

from _models import add_model_args, load_model
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.llama_index import HyperLoRALLM, skill_tool
from hyperlora_integrations.skills import SkillLibrary

SYSTEM = "You are a helpful assistant. Pick the tool whose description fits the request and pass it the text."
SKILLS = {
    "formalize": "Rewrite the user's text as a polite, formal business email.",
    "summarize": "Summarize the user's text in one short sentence.",
    "extract_dates": "List every date and time mentioned in the user's text, one per line.",
}
REQUESTS = [
    "Please make this formal: hey, the report is late again, send it by friday or we're done.",
    "Summarize: the ferry leaves at 7:15 and 16:40, tickets are 14 crowns and bikes ride free downstairs.",
    "Which dates are in this: kickoff on 3 May, review on 17 June at 10:00, launch 1 September.",
]


async def run_agent(agent: FunctionAgent, request: str, max_iterations: int) -> tuple[list[ToolCallResult], str]:
    handler = agent.run(user_msg=request, max_iterations=max_iterations)
    calls = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    result = await handler
    return calls, str(result.response.content or "").strip()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--store", default=None, help="adapter store directory (skills persist across runs)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 96 (64 with --tiny)")
    parser.add_argument("--max-iterations", type=int, default=4)
    args = parser.parse_args(argv)

    model = load_model(args, need=("t2l",))
    max_new = args.max_new_tokens or (64 if args.tiny else 96)
    llm = HyperLoRALLM(model, max_new_tokens=max_new)
    library = SkillLibrary(model, AdapterStore(args.store) if args.store else None)
    tools = [skill_tool(llm, name, description, library=library) for name, description in SKILLS.items()]
    for tool in tools:
        print(f"skill {tool.metadata.name}: adapter {tool.adapter.id[:8]} rank {tool.adapter.rank}")

    # 1. A tool on its own: the same input with and without the skill adapter.
    sample = REQUESTS[0]
    print(f"\ninput: {sample}")
    print(f"  base model:       {llm.complete(sample).text.strip()!r}")
    print(f"  formalize skill:  {tools[0].call(input=sample).content.strip()!r}")

    # 2. The tools inside LlamaIndex's FunctionAgent, with the local model choosing the calls.
    agent = FunctionAgent(tools=tools, llm=llm, system_prompt=SYSTEM, initial_tool_choice="any")
    rows = []
    for request in REQUESTS:
        try:
            calls, answer = asyncio.run(run_agent(agent, request, args.max_iterations))
        except Exception as exc:  # e.g. the model kept calling tools past --max-iterations
            print(f"\nrequest: {request}\n  agent failed: {type(exc).__name__}: {exc}")
            rows.append({"request": request, "tools": [], "answer": None, "error": str(exc)})
            continue
        used = [c.tool_name for c in calls]
        print(f"\nrequest: {request}\n  tools used: {used}")
        for c in calls:
            print(f"    {c.tool_name}({c.tool_kwargs}) -> {str(c.tool_output.content).strip()[:200]!r}")
        print(f"  answer: {answer!r}")
        rows.append({"request": request, "tools": used, "answer": answer})
    if args.tiny:
        print("\n(tiny random model: skills are random adapters and answers meaningless, often ''; the wiring is real)")
    return rows


if __name__ == "__main__":
    main()
