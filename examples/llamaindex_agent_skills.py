"""Skills as agent tools: Text-to-LoRA adapters behind LlamaIndex ``FunctionTool``s in a ``ReActAgent``.

Each skill is a plain-language description turned into a LoRA adapter once (and kept in a
``SkillLibrary``); ``skill_tool`` wraps it as a tool that answers its input with the adapter
active on the local model. No skill instructions occupy the prompt.

The agent's reasoning needs an LLM that follows the ReAct format. A 135M-parameter model mostly
does not, and nothing larger is available offline, so by default the reasoning is done by
``SkillRouterLLM`` below: it picks the tool whose skill description is closest to the request
(``SkillLibrary.scores``, the core's routing) and answers with what the tool returned. Replace it
with any capable LlamaIndex LLM (``--reasoner hyperlora`` tries the local model itself).

    python examples/llamaindex_agent_skills.py          # default model (needs a T2L checkpoint)
    python examples/llamaindex_agent_skills.py --tiny   # tiny random model: runs in seconds, gibberish
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from typing import Any

from _models import add_model_args, load_model
from llama_index.core.agent.workflow import ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.llama_index import HyperLoRALLM, skill_tool
from hyperlora_integrations.skills import SkillLibrary

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


class SkillRouterLLM(CustomLLM):
    """ReAct reasoning by routing: Action = the closest skill, then Answer = the observation.

    A deterministic stand-in for a reasoning LLM, so the agent loop runs offline on any model.
    """

    _library: SkillLibrary = PrivateAttr()

    def __init__(self, library: SkillLibrary, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._library = library

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="skill-router", is_chat_model=True)

    def _step(self, messages: Sequence[ChatMessage]) -> str:
        last = messages[-1].content or ""
        if messages[-1].role == MessageRole.USER and last.startswith("Observation:"):
            observation = last[len("Observation:") :].strip()
            return f"Thought: I can answer without using any more tools.\nAnswer: {observation}"
        request = next(m.content or "" for m in reversed(messages) if m.role == MessageRole.USER)
        name, score = self._library.scores(request)[0]
        return (
            f"Thought: The closest skill is {name} (similarity {score:.2f}). I need to use a tool.\n"
            f"Action: {name}\nAction Input: {json.dumps({'input': request})}"
        )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=self._step(messages)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        text = self._step(messages)
        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=text)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._step([ChatMessage(role=MessageRole.USER, content=prompt)]))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text = self._step([ChatMessage(role=MessageRole.USER, content=prompt)])
        yield CompletionResponse(text=text, delta=text)


async def run_agent(agent: ReActAgent, request: str, max_iterations: int) -> tuple[list[ToolCallResult], str]:
    handler = agent.run(user_msg=request, max_iterations=max_iterations)
    calls = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    result = await handler
    return calls, str(result.response.content or "").strip()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--reasoner", choices=["router", "hyperlora"], default="router")
    parser.add_argument("--store", default=None, help="adapter store directory (skills persist across runs)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (8 with --tiny)")
    parser.add_argument("--max-iterations", type=int, default=6)
    args = parser.parse_args(argv)

    model = load_model(args, need=("t2l",))
    max_new = args.max_new_tokens or (8 if args.tiny else 64)
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

    # 2. The tools inside LlamaIndex's workflow ReActAgent.
    reasoner = SkillRouterLLM(library) if args.reasoner == "router" else llm
    agent = ReActAgent(tools=tools, llm=reasoner)
    rows = []
    for request in REQUESTS:
        try:
            calls, answer = asyncio.run(run_agent(agent, request, args.max_iterations))
        except Exception as exc:  # a weak reasoner may never produce a parsable ReAct step
            print(f"\nrequest: {request}\n  agent failed: {type(exc).__name__}: {exc}")
            rows.append({"request": request, "tools": [], "answer": None, "error": str(exc)})
            continue
        used = [c.tool_name for c in calls]
        print(f"\nrequest: {request}\n  tools used: {used}\n  answer: {answer!r}")
        rows.append({"request": request, "tools": used, "answer": answer})
    if args.tiny:
        print("\n(tiny random model: skills are random adapters and answers gibberish; the wiring is real)")
    return rows


if __name__ == "__main__":
    main()
