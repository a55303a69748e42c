"""The memory in LangChain and LlamaIndex, on the tiny model.

LangChain: the standard ``RunnableWithMessageHistory`` chat, with its history factory and its
chat model swapped for the memory's (the two-line change of docs/memory.md): the history keeps the
budget, the session's adapter activates once consolidated, another session's never does, and
``clear()`` forgets. LlamaIndex: ``SimpleChatEngine`` and ``FunctionAgent`` take the memory
unchanged; the LLM activates the memory adapter through the reference ``get()`` puts in front.
"""

from __future__ import annotations

import pytest

from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.memory import MemoryConfig

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

QUICK = ConsolidationConfig(steps=2, batch_size=2, max_seq_tokens=48, lr=2e-2)
CONFIG = MemoryConfig(
    recent_tokens=48, job_tokens=64, min_job_tokens=24, replay_tokens=24, consolidation=QUICK, background=False
)


def langchain_chat(model, store):
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    from hyperlora_integrations.langchain import ChatHyperLoRA, HyperLoRAMemory, with_memory

    llm = ChatHyperLoRA(model=model, max_tokens=3)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant."), MessagesPlaceholder("history"), ("human", "{input}")]
    )
    get_session_history = HyperLoRAMemory(llm, store, config=CONFIG).get_session_history  # change 1
    chain = prompt | with_memory(llm)  # change 2: the model, bound to the session's memory
    chat = RunnableWithMessageHistory(
        chain, get_session_history, input_messages_key="input", history_messages_key="history"
    )
    return chat, get_session_history.__self__


def ask(chat, text: str, session: str):
    return chat.invoke({"input": text}, config={"configurable": {"session_id": session}})


def test_langchain_history_keeps_the_budget_and_activates_only_the_sessions_adapter(tiny_model, store):
    from langchain_core.messages import AIMessage, HumanMessage

    chat, memory = langchain_chat(tiny_model, store)
    for i in range(5):
        reply = ask(chat, f"My bike lock code is {7300 + i}.", "alice")
        assert reply.response_metadata["adapters"] == []  # nothing consolidated yet
    history = memory.get_session_history("alice")
    assert len(history.all_messages) == 10
    assert isinstance(history.all_messages[0], HumanMessage) and isinstance(history.all_messages[1], AIMessage)
    assert history.all_messages[0].content == "My bike lock code is 7300."
    history.memory.consolidate_now()
    assert sum(t.tokens for t in history.memory.prompt_turns()) <= CONFIG.recent_tokens
    assert len(history.messages) < len(history.all_messages)  # the old turns left the prompt ...
    reply = ask(chat, "What is my bike lock code?", "alice")
    [used] = reply.response_metadata["adapters"]  # ... and are served by the session's adapter
    assert used["id"] == history.memory.adapter().id and used["via"] == "adapters"
    other = ask(chat, "What is my bike lock code?", "bob")
    assert other.response_metadata["adapters"] == []  # bob never gets alice's adapter
    assert memory.get_session_history("bob").memory.namespace != history.memory.namespace
    history.clear()
    assert (
        memory.get_session_history("alice").all_messages == [] and store.list(namespace=history.memory.namespace) == []
    )


def test_langchain_bound_model_streams_and_leaves_plain_calls_alone(tiny_model, store):
    from langchain_core.messages import AIMessage, ToolMessage

    chat, memory = langchain_chat(tiny_model, store)
    history = memory.get_session_history("carol")
    history.add_messages(
        [AIMessage(content="", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "c1"}])]
        + [ToolMessage(content="result", tool_call_id="c1", name="lookup")]
    )
    kept = history.all_messages
    assert kept[0].tool_calls[0]["name"] == "lookup" and kept[1].tool_call_id == "c1"
    for i in range(5):
        ask(chat, f"My bike lock code is {7300 + i}.", "carol")
    history.memory.consolidate_now()
    chunks = list(chat.stream({"input": "Code?"}, config={"configurable": {"session_id": "carol"}}))
    assert chunks and chunks[-1].response_metadata.get("adapters", [{}])[0].get("id") == history.memory.adapter().id
    from langchain_core.messages import HumanMessage

    from hyperlora_integrations.langchain import ChatHyperLoRA, with_memory

    plain = with_memory(ChatHyperLoRA(model=tiny_model, max_tokens=2))  # no memory history in the config
    assert plain.invoke([HumanMessage(content="hi")]).response_metadata["adapters"] == []


def test_langchain_memory_refuses_a_non_model():
    from hyperlora_integrations.langchain import HyperLoRAMemory

    with pytest.raises(InvalidInputError):
        HyperLoRAMemory(object())


def llama_setup(model, store, user: str, **llm_kwargs):
    from hyperlora_integrations.llama_index import HyperLoRALLM, HyperLoRAMemory

    llm = HyperLoRALLM(model, store=store, max_new_tokens=3, **llm_kwargs)
    return llm, HyperLoRAMemory.from_defaults(llm=llm, user_id=user, config=CONFIG)


def test_llama_index_chat_engine_takes_the_memory_unchanged(tiny_model, store, monkeypatch):
    from llama_index.core.chat_engine import SimpleChatEngine

    llm, memory = llama_setup(tiny_model, store, "dana")
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory, system_prompt="Be brief.")
    for i in range(5):
        engine.chat(f"I live at number {40 + i} Elm Street.")
    assert len(memory.get_all()) == 10 and memory.get_all()[0].content == "I live at number 40 Elm Street."
    memory.memory.consolidate_now()
    seen = []
    real = tiny_model.stream_chunks

    def spy(prompt, adapters=(), **kwargs):
        seen.append(([a.id for a in adapters], prompt))
        return real(prompt, adapters, **kwargs)

    monkeypatch.setattr(tiny_model, "stream_chunks", spy)
    engine.chat("Where do I live?")
    adapters, prompt = seen[-1]
    assert adapters == [memory.memory.adapter().id]
    assert all("hyperlora-ref" not in m["content"] for m in prompt)  # the reference never reaches the model
    assert prompt[-1]["content"] == "Where do I live?"
    # Bob's engine, same LLM and store: his memory has no adapter and names only his namespace.
    _, bob = llama_setup(tiny_model, store, "bob")
    SimpleChatEngine.from_defaults(llm=llm, memory=bob).chat("Hello")
    assert seen[-1][0] == []
    # An LLM restricted to bob's namespace rejects a reference to dana's memory even if copied over.
    bobs_llm = type(llm)(tiny_model, store=store, max_new_tokens=2, namespaces=[bob.namespace])
    response = bobs_llm.chat(memory.get())
    assert response.raw["adapters"] == [] and response.raw["rejected_references"] == 1
    engine.reset()
    assert memory.get_all() == [] and store.list(namespace=memory.namespace) == []


def test_llama_index_set_extends_or_rewrites_and_store_is_checked(tiny_model, store):
    from llama_index.core.base.llms.types import ChatMessage

    from hyperlora_integrations.adapters import AdapterStore
    from hyperlora_integrations.llama_index import HyperLoRALLM, HyperLoRAMemory

    _, memory = llama_setup(tiny_model, store, "erin")
    memory.put(ChatMessage(role="user", content="one"))
    memory.set([ChatMessage(role="user", content="one"), ChatMessage(role="assistant", content="two")])
    assert [(t.role, t.content) for t in memory.memory.turns()] == [("user", "one"), ("assistant", "two")]
    first = memory.memory.turns()[0].seq
    memory.set([ChatMessage(role="user", content="other")])
    assert [t.content for t in memory.memory.turns()] == ["other"] and memory.memory.turns()[0].seq > first
    with pytest.raises(InvalidInputError, match="memory adapter"):
        HyperLoRAMemory.from_defaults(llm=HyperLoRALLM(tiny_model, store=AdapterStore()), user_id="x", store=store)


async def test_llama_index_function_agent_takes_the_memory(tiny_model, store):
    from llama_index.core.agent.workflow import FunctionAgent

    llm, memory = llama_setup(tiny_model, store, "finn")
    agent = FunctionAgent(llm=llm, tools=[], system_prompt="Be brief.")
    await agent.run("My cat is called Pip.", memory=memory)
    turns = memory.memory.turns()
    assert turns[0].role == "user" and turns[0].content == "My cat is called Pip." and turns[-1].role == "assistant"
