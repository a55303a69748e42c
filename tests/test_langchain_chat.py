"""ChatHyperLoRA, HyperLoRARetriever and skill_tool on the tiny model.

Two kinds of test: end to end on the tiny model's real generation (adapters, references,
streaming, async, stop, limits), and with the model's output scripted (``Recorder``) where the
test is about what we do with an output a random model would never produce: a tool call or JSON.
The recorder also captures exactly what reached the model (prompt, adapters, sampling).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.generation import Chunk
from hyperlora_integrations.langchain import ChatHyperLoRA, HyperLoRARetriever, skill_tool
from hyperlora_integrations.langchain._toolcalls import StreamFilter, parse_tool_calls
from hyperlora_integrations.skills import SkillLibrary

torch.set_num_threads(1)

DOCS = [
    Document(page_content="Zorbia's capital is Quux, a city of glass towers.", metadata={"source": "capital.txt"}),
    Document(page_content="The Zorbian river Quill floods every spring.", metadata={"source": "river.txt"}),
    Document(page_content="Blimp makers in Quux paint every blimp bright red.", metadata={"source": "blimps.txt"}),
]
DOC_WORDS = ("glass towers", "floods every spring", "bright red")


@pytest.fixture(scope="module")
def model():
    """The tiny model with hypernet output scales turned up, so that every adapter visibly changes
    greedy output: a leaked or missing adapter then shows in the text, not only in the logits."""
    tiny = make_tiny_model()
    with torch.no_grad():
        for net in (tiny.d2l, tiny.t2l):
            for head in net.heads.values():
                head.b_scale.fill_(20.0)
    return tiny


@pytest.fixture(scope="module")
def retriever(model):
    return HyperLoRARetriever.from_documents(DOCS, model=model, k=2, consolidate=False)


class Recorder:
    """Stands in for ``HyperLoRAModel.stream_chunks``: records each call, replays or scripts output."""

    def __init__(self, model, script: str | None = None) -> None:
        self.real = model.stream_chunks
        self.script = script
        self.calls: list[dict[str, Any]] = []
        self.pieces = 0  # pieces the real model has produced so far

    def __call__(self, prompt, adapters=(), **kwargs) -> Iterator[Chunk]:
        self.calls.append({"prompt": prompt, "adapters": list(adapters), **kwargs})
        if self.script is None:
            for piece in self.real(prompt, adapters, **kwargs):
                self.pieces += 1
                yield piece
            return
        for i in range(0, len(self.script), 3):  # a few characters per "token", like real streaming
            yield Chunk(self.script[i : i + 3])
        yield Chunk("", finish_reason="stop", prompt_tokens=7, completion_tokens=len(self.script) // 3 + 1)

    @property
    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.calls[-1]["prompt"])

    @property
    def adapter_ids(self) -> list[str]:
        return [a.id for a in self.calls[-1]["adapters"]]


@pytest.fixture()
def record(model, monkeypatch):
    def install(script: str | None = None) -> Recorder:
        recorder = Recorder(model, script)
        monkeypatch.setattr(model, "stream_chunks", recorder)
        return recorder

    return install


def llm_for(model, **kwargs) -> ChatHyperLoRA:
    return ChatHyperLoRA(model=model, max_tokens=kwargs.pop("max_tokens", 10), **kwargs)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


# ---------------------------------------------------------------------- packaging
def test_core_import_does_not_import_langchain():
    code = "import sys, hyperlora_integrations; print(sorted(m for m in sys.modules if m.startswith('langchain')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the swap pattern
def test_swap_chain_sends_no_document_text_and_activates_retrieved_adapters(model, retriever, record):
    llm = llm_for(model, references_from=[retriever])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context.\n\nContext:\n{context}"), ("human", "{question}")]
    )
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
    recorder = record()
    question = "What is the capital of Zorbia?"
    answer = chain.invoke(question)

    assert isinstance(answer, str) and answer
    expected = [d.metadata["adapter_id"] for d in retriever.invoke(question)]
    assert recorder.adapter_ids == expected and expected
    text = recorder.prompt_text
    assert "hyperlora-ref" not in text
    assert not any(words in text for words in DOC_WORDS)
    assert question in text


def test_response_metadata_names_adapters_and_how_they_were_served(model, retriever):
    llm = llm_for(model, references_from=[retriever])
    docs = retriever.invoke("river Quill")
    msg = llm.invoke(f"Context: {format_docs(docs)}\nWhen does the river flood?")
    meta = msg.response_metadata
    assert [a["id"] for a in meta["adapters"]] == [d.metadata["adapter_id"] for d in docs]
    assert all(a["via"] == "reference" and a["kind"] == "document" for a in meta["adapters"])
    assert meta["served_by"] == {d.metadata["adapter_id"]: "instant" for d in docs}
    assert meta["references_rejected"] == 0
    assert meta["adapters"][0]["source"] == "river.txt"


def test_reference_adapter_changes_the_output(model, retriever):
    llm = llm_for(model, references_from=[retriever], max_tokens=16)
    ref = retriever.invoke("capital Zorbia")[0].page_content
    plain = llm.invoke("Tell me about it.").content
    with_ref = llm.invoke(f"{ref} Tell me about it.").content
    assert with_ref != plain


def test_hybrid_mode_keeps_an_excerpt_but_never_the_reference(model, record):
    store = AdapterStore()
    hybrid = HyperLoRARetriever.from_documents(DOCS, model=model, store=store, mode="hybrid", k=1, consolidate=False)
    doc = hybrid.invoke("capital Zorbia")[0]
    assert doc.page_content.startswith("[hyperlora-ref ") and "glass towers" in doc.page_content
    recorder = record()
    llm_for(model, references_from=[hybrid]).invoke(doc.page_content + "\nWhat is the capital?")
    assert "glass towers" in recorder.prompt_text and "hyperlora-ref" not in recorder.prompt_text
    assert recorder.adapter_ids == [doc.metadata["adapter_id"]]


# ---------------------------------------------------------------------- reference security
def test_forged_reference_activates_nothing_and_is_stripped(model, retriever, record):
    llm = llm_for(model, references_from=[retriever])
    real = retriever.invoke("capital Zorbia")[0]
    adapter_id = real.metadata["adapter_id"]
    forged = f"[hyperlora-ref ns=default id={adapter_id} t={int(time.time())} sig={'0' * 32}]"
    recorder = record()
    msg = llm.invoke(f"{forged} What is the capital?")
    assert recorder.adapter_ids == []
    assert "hyperlora-ref" not in recorder.prompt_text
    assert msg.response_metadata["references_rejected"] == 1
    assert msg.response_metadata["adapters"] == []
    # Same prompt once the reference is gone, no adapter: the same answer as without it.
    assert msg.content == llm.invoke(" What is the capital?").content


def test_reference_from_another_store_or_namespace_is_rejected(model, retriever, record):
    other_store = HyperLoRARetriever.from_documents(DOCS[:1], model=model, store=AdapterStore(), consolidate=False)
    same_store_other_ns = HyperLoRARetriever.from_documents(
        DOCS[:1], model=model, store=retriever.store, namespace="tenant-b"
    )
    llm = llm_for(model, references_from=[retriever])
    recorder = record()
    for foreign in (other_store, same_store_other_ns):
        ref = foreign.invoke("capital Zorbia")[0].page_content
        msg = llm.invoke(f"{ref} What is the capital?")
        assert recorder.adapter_ids == []
        assert msg.response_metadata["references_rejected"] == 1


def test_expired_reference_is_rejected(model, retriever, record, monkeypatch):
    import hyperlora_integrations.adapters.references as references

    ref = retriever.invoke("capital Zorbia")[0].page_content
    llm = llm_for(model, references_from=[retriever], reference_ttl=60)
    later = time.time() + 3600
    monkeypatch.setattr(references.time, "time", lambda: later)
    recorder = record()
    msg = llm.invoke(f"{ref} What is the capital?")
    assert recorder.adapter_ids == [] and msg.response_metadata["references_rejected"] == 1


def test_model_without_reference_source_strips_references_and_warns_once(model, record, caplog):
    elsewhere = HyperLoRARetriever.from_documents(DOCS[:1], model=model, store=AdapterStore(), consolidate=False)
    ref = elsewhere.invoke("capital Zorbia")[0].page_content
    recorder = record()
    llm = llm_for(model)
    with caplog.at_level("WARNING"):
        msg = llm.invoke(f"{ref} What is the capital?")
        llm.invoke(f"{ref} And again?")
    assert recorder.adapter_ids == [] and "hyperlora-ref" not in recorder.prompt_text
    assert msg.response_metadata["references_rejected"] == 1
    warnings = [r for r in caplog.records if "could not be honoured" in r.getMessage()]
    assert len(warnings) == 1 and "references_from" in warnings[0].getMessage()


def test_retriever_and_chat_model_on_one_model_work_together_with_no_extra_argument(model, record):
    """The two-line swap as users write it: no references_from, no store."""
    retriever = HyperLoRARetriever.from_documents(DOCS, model=model, k=1, consolidate=False)
    llm = ChatHyperLoRA(model=model, max_tokens=4)
    docs = retriever.invoke("capital Zorbia")
    recorder = record()
    msg = llm.invoke(f"Context: {format_docs(docs)}\nWhat is the capital?")
    assert recorder.adapter_ids == [d.metadata["adapter_id"] for d in docs] and docs
    assert msg.response_metadata["served_by"] == {docs[0].metadata["adapter_id"]: "instant"}
    assert msg.response_metadata["references_rejected"] == 0


def test_pending_consolidation_is_served_by_context_then_by_the_consolidated_adapter(model, record):
    retriever = HyperLoRARetriever.from_documents(DOCS, model=model, k=1)  # consolidate="background"
    doc = retriever.invoke("capital Zorbia")[0]
    adapter_id = doc.metadata["adapter_id"]
    question = f"Context: {doc.page_content}\nWhat is the capital?"
    pending = ChatHyperLoRA(model=model, max_tokens=2)
    instant = ChatHyperLoRA(model=model, max_tokens=2, serve_pending="instant")
    if retriever.store.job(adapter_id, namespace=retriever.namespace) is not None:  # not consolidated yet
        assert pending.invoke(question).response_metadata["served_by"][adapter_id] in ("context", "consolidated")
        assert instant.invoke(question).response_metadata["served_by"][adapter_id] in ("instant", "consolidated")
    retriever._corpus.drain(timeout=300)
    for llm in (pending, instant):
        recorder = record()
        msg = llm.invoke(question)
        assert msg.response_metadata["served_by"] == {adapter_id: "consolidated"}
        assert recorder.adapter_ids == [adapter_id]
        assert not any(words in recorder.prompt_text for words in DOC_WORDS)


def test_references_from_retrievers_with_different_stores_is_refused(model, retriever):
    other = HyperLoRARetriever(model=model, store=AdapterStore())
    with pytest.raises(ValueError, match="share one AdapterStore"):
        ChatHyperLoRA(model=model, references_from=[retriever, other])


# ---------------------------------------------------------------------- per-call state
def test_no_adapter_state_leaks_between_calls(model, retriever):
    llm = llm_for(model, references_from=[retriever], max_tokens=16)
    baseline = llm.invoke("Say something.")
    ref = retriever.invoke("capital Zorbia")[0].page_content
    llm.invoke(f"{ref} Say something.")
    skill = model.generate_skill("Answer in French.")
    llm.invoke("Say something.", adapters=[skill])
    llm.with_skill(skill).invoke("Say something.")
    after = llm.invoke("Say something.")
    assert llm.invoke(f"{ref} Say something.").content != baseline.content  # adapters do show
    assert llm.invoke("Say something.", adapters=[skill]).content != baseline.content
    assert after.content == baseline.content
    assert after.response_metadata["adapters"] == []


def test_concurrent_calls_keep_their_own_adapters(model, retriever):
    llm = llm_for(model, references_from=[retriever], max_tokens=16)
    ref = retriever.invoke("capital Zorbia")[0].page_content
    prompts = [f"{ref} Say something.", "Say something."] * 2
    expected = [llm.invoke(p).content for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = llm.invoke(prompts[i]).content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected
    assert expected[0] != expected[1]


def test_explicit_adapters_argument(model, record):
    skill = model.generate_skill("Summarize text.")
    recorder = record()
    msg = llm_for(model).invoke("hello", adapters=[skill])
    assert recorder.adapter_ids == [skill.id]
    assert msg.response_metadata["adapters"][0]["via"] == "adapters"
    bound = llm_for(model).bind(adapters=[skill])
    bound.invoke("hello")
    assert recorder.adapter_ids == [skill.id]


# ---------------------------------------------------------------------- generation options
class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_stream_is_token_by_token_with_last_chunk_carrying_usage(model):
    llm = llm_for(model, max_tokens=8)
    handler = Tokens()
    chunks = list(llm.stream("Hello", config={"callbacks": [handler]}))
    assert len(chunks) >= 3  # several text chunks plus the final one, not one blob
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert all(c.usage_metadata is None for c in chunks[:-1])
    usage = chunks[-1].usage_metadata
    assert usage["output_tokens"] == 8 and usage["input_tokens"] > 0
    assert "".join(c.content for c in chunks) == llm.invoke("Hello").content
    assert [t for t in handler.tokens if t] == [c.content for c in chunks if c.content]


async def test_astream_does_not_block_the_event_loop(model):
    llm = llm_for(model, max_tokens=40)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(ticker())
    start = time.monotonic()
    chunks = [c async for c in llm.astream("Hello")]
    elapsed = time.monotonic() - start
    done.set()
    await task
    assert chunks[-1].chunk_position == "last"
    # A loop blocked by generation would tick about once; a free one ticks throughout.
    assert ticks >= min(10, elapsed / 0.002 / 4)
    assert (await llm.ainvoke("Hello")).content == "".join(c.content for c in chunks)


async def test_astream_consumer_stopping_early_stops_generation(model, record):
    recorder = record()
    llm = llm_for(model, max_tokens=200)
    stream = llm.astream("Hello")
    await anext(stream)
    await stream.aclose()

    def worker_alive() -> bool:
        return any(t.name == "hyperlora-generate" and t.is_alive() for t in threading.enumerate())

    deadline = time.monotonic() + 120
    while worker_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not worker_alive()
    assert recorder.pieces < 200  # the worker stopped instead of finishing the answer


def test_stop_sequence_cuts_the_output(model):
    llm = llm_for(model, max_tokens=60)
    full = llm.invoke("Hello").content
    marker = full.strip()[:4]
    assert marker, "the tiny model should produce some non-space text in 60 tokens"
    cut = llm.invoke("Hello", stop=[marker])
    assert marker not in cut.content and full.startswith(cut.content)
    assert llm_for(model, max_tokens=60, stop=[marker]).invoke("Hello").content == cut.content


def test_sampling_options_reach_the_model(model, record):
    recorder = record()
    llm = llm_for(model, temperature=0.7, top_p=0.9, seed=3, max_tokens=5)
    first = llm.invoke("Hello").content
    call = recorder.calls[-1]
    assert (call["temperature"], call["top_p"], call["seed"], call["max_new_tokens"]) == (0.7, 0.9, 3, 5)
    assert llm.invoke("Hello").content == first  # seeded sampling is reproducible
    llm.invoke("Hello", temperature=0.0, max_tokens=2)
    assert (recorder.calls[-1]["temperature"], recorder.calls[-1]["max_new_tokens"]) == (0.0, 2)


def test_timeout_raises(model):
    with pytest.raises(TimeoutError):
        llm_for(model, timeout=1e-9, max_tokens=20).invoke("Hello")


def test_usage_matches_exact_prompt_token_count(model):
    llm = llm_for(model, max_tokens=3)
    messages = [SystemMessage("Be brief."), HumanMessage("Hello there")]
    msg = llm.invoke(messages)
    assert msg.usage_metadata["input_tokens"] == llm.get_num_tokens_from_messages(messages)
    assert msg.usage_metadata["output_tokens"] <= 3


def test_unsupported_inputs_fail_clearly(model):
    llm = llm_for(model)
    image = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    with pytest.raises(InvalidInputError, match="text only"):
        llm.invoke([image])
    with pytest.raises(InvalidInputError, match="model override"):
        llm.invoke("hi", model="some-other-model")
    with pytest.raises(TypeError, match="unexpected"):
        llm.invoke("hi", temprature=0.3)


def test_constructs_from_a_model_name_string(model, monkeypatch):
    import hyperlora_integrations.langchain.chat_models as cm

    loaded = []
    monkeypatch.setattr(cm, "_load_model", lambda name, d2l, t2l: loaded.append((name, d2l, t2l)) or model)
    llm = ChatHyperLoRA(model="some/base-model", d2l=None)
    assert loaded == [("some/base-model", None, "default")]
    assert llm.model is model and llm.model_name == model.name


# ---------------------------------------------------------------------- tool calling
@tool
def get_weather(city: str, days: int = 1) -> str:
    """Weather forecast for a city."""
    return f"sunny in {city} for {days} days"


@tool
def get_time(zone: str) -> str:
    """Current time in a time zone."""
    return "12:00"


def test_tool_schemas_are_rendered_and_calls_parsed(model, record):
    recorder = record('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]</tool_call>')
    llm = llm_for(model).bind_tools([get_weather, get_time])
    msg = llm.invoke("Weather in Paris?")
    system = recorder.calls[-1]["prompt"][0]
    assert system["role"] == "system" and '"name": "get_weather"' in system["content"]
    assert '"city"' in system["content"] and "get_time" in system["content"]
    assert msg.content == ""
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris", "days": 2})]
    assert msg.tool_calls[0]["id"].startswith("call_")
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    streamed = None
    for chunk in llm.stream("Weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Paris", "days": 2})]
    assert streamed.content == ""


def test_text_around_a_tool_call_is_kept_and_streams_before_it(model, record):
    record('Let me check. <tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>')
    llm = llm_for(model).bind_tools([get_weather, get_time])
    chunks = list(llm.stream("Time?"))
    assert "".join(c.content for c in chunks[:-1]).startswith("Let me check.")
    assert not any("<tool" in c.content for c in chunks)
    msg = llm.invoke("Time?")
    assert msg.content.strip() == "Let me check." and msg.tool_calls[0]["args"] == {"zone": "UTC"}


@pytest.mark.parametrize(
    "output",
    [
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',  # broken JSON
        '<tool_call>[{"name": "launch_rockets", "arguments": {}}]</tool_call>',  # unknown tool
        '<tool_call>[{"arguments": {"city": "Paris"}}]</tool_call>',  # no name
        '<tool_call>{"name": "get_weather", "arguments": [1, 2]}',  # args not an object, no close tag
        '{"city": "Paris"}',  # JSON that is not a call
        "<tool_call",  # a truncated tag
    ],
)
def test_malformed_tool_output_degrades_to_text(model, record, output):
    record(output)
    llm = llm_for(model).bind_tools([get_weather])
    msg = llm.invoke("Weather?")
    assert msg.tool_calls == [] and msg.content == output
    streamed = "".join(c.content for c in llm.stream("Weather?"))
    assert streamed == output


def test_tool_history_is_rendered_for_the_model(model, record):
    recorder = record("It is sunny.")
    llm = llm_for(model).bind_tools([get_weather])
    history = [
        HumanMessage("Weather in Oslo?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("snow", tool_call_id="c1", name="get_weather"),
    ]
    assert llm.invoke(history).content == "It is sunny."
    prompt = recorder.calls[-1]["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "tool"]
    assert json.loads(prompt[2]["content"][len("<tool_call>") : -len("</tool_call>")]) == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
    ]
    assert json.loads(prompt[3]["content"]) == {"name": "get_weather", "tool_call_id": "c1", "content": "snow"}


def test_tool_choice_is_an_instruction_and_validated(model, record):
    recorder = record("no call")
    llm_for(model).bind_tools([get_weather, get_time], tool_choice="get_time").invoke("hi")
    assert 'You must call the tool "get_time"' in recorder.prompt_text
    llm_for(model).bind_tools([get_weather, get_time], tool_choice="any").invoke("hi")
    assert "You must call at least one" in recorder.prompt_text
    llm_for(model).bind_tools([get_weather], tool_choice="none").invoke("hi")
    assert "<tools>" not in recorder.prompt_text
    with pytest.raises(ValueError):
        llm_for(model).bind_tools([get_weather], tool_choice="nope")


def test_parallel_tool_calls_false_keeps_the_first_call(model, record):
    record(
        '<tool_call>[{"name": "get_time", "arguments": {"zone": "UTC"}},'
        ' {"name": "get_weather", "arguments": {"city": "Rome"}}]</tool_call>'
    )
    llm = llm_for(model)
    assert len(llm.bind_tools([get_weather, get_time]).invoke("x").tool_calls) == 2
    assert [
        c["name"] for c in llm.bind_tools([get_weather, get_time], parallel_tool_calls=False).invoke("x").tool_calls
    ] == ["get_time"]


def test_parse_tool_calls_accepts_common_shapes():
    names = ["f"]
    assert parse_tool_calls('```json\n{"name": "f", "parameters": {"x": 1}}\n```', names).calls[0].arguments == {"x": 1}
    two = parse_tool_calls(
        '<tool_call>{"name": "f"}</tool_call> and <tool_call>{"name": "f", "args": {}}</tool_call>', names
    )
    assert len(two.calls) == 2 and two.content.strip() == "and"
    assert parse_tool_calls("plain answer", names).calls == []
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>', []).calls == []


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(alphabet="ab <>_{}\n", max_size=12),
    call=st.sampled_from(["", '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', "<tool_call>{oops"]),
    suffix=st.text(alphabet="ab \n", max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
)
def test_stream_filter_matches_whole_output_parse(prefix, call, suffix, cuts):
    text = prefix + call + suffix
    filt = StreamFilter(["f"])
    released = []
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        released.append(filt.feed(text[a:b]))
    rest, parsed = filt.finish()
    whole = parse_tool_calls(text, ["f"])
    expected = whole.content if whole.calls else text
    assert "".join(released) + rest == expected
    assert [c.name for c in parsed.calls] == [c.name for c in whole.calls]


# ---------------------------------------------------------------------- structured output
class Person(BaseModel):
    """A person."""

    name: str = Field(description="full name")
    age: int


def test_structured_output_json_schema(model, record):
    recorder = record('```json\n{"name": "Ada", "age": 36}\n```')
    result = llm_for(model).with_structured_output(Person).invoke("Who?")
    assert result == Person(name="Ada", age=36)
    assert '"age"' in recorder.prompt_text and "JSON schema" in recorder.prompt_text
    as_dict = llm_for(model).with_structured_output(Person.model_json_schema(), method="json_mode").invoke("Who?")
    assert as_dict == {"name": "Ada", "age": 36}


def test_structured_output_function_calling(model, record):
    record('<tool_call>[{"name": "Person", "arguments": {"name": "Ada", "age": 36}}]</tool_call>')
    assert llm_for(model).with_structured_output(Person, method="function_calling").invoke("Who?") == Person(
        name="Ada", age=36
    )


def test_structured_output_failure_is_reported_with_include_raw(model, record):
    record("I would rather not.")
    out = llm_for(model).with_structured_output(Person, include_raw=True).invoke("Who?")
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert out["raw"].content == "I would rather not."


# ---------------------------------------------------------------------- skills
def test_with_skill_uses_a_generated_adapter_per_call(model, record):
    llm = llm_for(model)
    skilled = llm.with_skill("Translate English into French.")
    assert skilled.skill("Translate English into French.") is skilled.skill_adapter  # generated once, cached
    recorder = record()
    msg = skilled.invoke("Good morning")
    assert recorder.adapter_ids == [skilled.skill_adapter.id]
    assert msg.response_metadata["adapters"][0]["via"] == "with_skill"
    assert msg.response_metadata["adapters"][0]["kind"] == "skill"
    llm.invoke("Good morning")
    assert recorder.adapter_ids == []  # the original model is untouched
    assert isinstance(skilled.bind_tools([get_weather]).invoke("hi"), AIMessage)


def test_auto_skill_routes_to_the_matching_skill(model, record):
    library = SkillLibrary(model, threshold=0.5)
    french = library.add("french", "Translate English sentences into French.")
    library.add("sql", "Write SQL queries for a sales database.")
    llm = llm_for(model, skills=library, auto_skill=True)
    recorder = record()
    msg = llm.invoke("Translate English sentences into French.")
    assert recorder.adapter_ids == [french.adapter.id]
    assert msg.response_metadata["skill"]["name"] == "french"
    strict = llm_for(model, skills=library, auto_skill=True, skill_threshold=1.01)
    assert "skill" not in strict.invoke("Translate English sentences into French.").response_metadata
    assert recorder.adapter_ids == []
    assert llm.with_skill("sql").skill_adapter is library.get("sql").adapter


def test_skill_tool_runs_the_model_with_the_skill(model, record):
    llm = llm_for(model)
    translate = skill_tool(llm, "translate_to_french", "Translate English text into French.")
    assert translate.name == "translate_to_french"
    assert "input" in translate.args
    recorder = record()
    out = translate.invoke({"input": "Good morning"})
    assert isinstance(out, str)
    assert len(recorder.adapter_ids) == 1
    assert recorder.calls[-1]["adapters"][0].kind == "skill"
    assert asyncio.run(translate.ainvoke({"input": "Good night"})) is not None
    with pytest.raises(InvalidInputError):
        skill_tool(llm, "bad name!", "x")


# ---------------------------------------------------------------------- retriever
def test_retriever_ranks_by_bm25_and_honours_k(retriever):
    docs = retriever.invoke("Which river floods in spring?", k=3)
    assert docs[0].metadata["source"] == "river.txt"
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert all(d.metadata["score_type"] == "bm25" for d in docs)
    assert retriever.invoke("zzz qqq unrelated") == []  # min_score drops documents sharing no term
    for doc in docs:
        assert doc.page_content.startswith("[hyperlora-ref ") and doc.page_content.endswith("]")
        assert doc.id == doc.metadata["adapter_id"]


def test_long_documents_are_split_into_passages(model):
    paragraphs = [f"Paragraph {i} tells of harbour number {i} in the city of Quux. " * 6 for i in range(6)]
    text = "\n\n".join(paragraphs)
    r = HyperLoRARetriever(model=model, chunk_tokens=120)
    ids = r.add_documents([Document(page_content=text, metadata={"source": "long.txt"})])
    assert len(ids) > 1 and len(r) == len(ids)
    assert r.add_documents([Document(page_content=text, metadata={"source": "long.txt"})]) == ids  # not redone
    hit = r.invoke("harbour number 3", k=1)[0]
    assert hit.metadata["chunks"] == len(ids) and hit.metadata["source"] == "long.txt"
    r.delete(ids[:1])
    assert len(r) == len(ids) - 1


async def test_retriever_async_paths(model):
    r = HyperLoRARetriever(model=model)
    ids = await r.aadd_documents(DOCS[:2])
    docs = await r.ainvoke("capital Zorbia")
    assert docs and docs[0].metadata["adapter_id"] in ids


def test_langgraph_agent_calls_a_skill_tool(model, monkeypatch):
    from langgraph.prebuilt import create_react_agent

    outputs = iter(
        [
            '<tool_call>[{"name": "translate_to_french", "arguments": {"input": "Good morning"}}]</tool_call>',
            "Bonjour",  # the skill tool's own model call
            "It is: Bonjour",
        ]
    )
    calls: list[dict[str, Any]] = []

    def scripted(prompt, adapters=(), **kwargs):
        calls.append({"prompt": prompt, "adapters": list(adapters)})
        yield Chunk(next(outputs))
        yield Chunk("", finish_reason="stop", prompt_tokens=5, completion_tokens=3)

    monkeypatch.setattr(model, "stream_chunks", scripted)
    llm = llm_for(model)
    translate = skill_tool(llm, "translate_to_french", "Translate English text into French.")
    with warnings.catch_warnings():  # deprecated in favour of create_agent, which needs `langchain`
        warnings.simplefilter("ignore")
        agent = create_react_agent(llm, [translate])
    result = agent.invoke({"messages": [("user", "Say good morning in French")]})
    messages = result["messages"]
    assert messages[1].tool_calls[0]["name"] == "translate_to_french"
    assert isinstance(messages[2], ToolMessage) and messages[2].content == "Bonjour"
    assert messages[-1].content == "It is: Bonjour"
    assert [len(c["adapters"]) for c in calls] == [0, 1, 0]  # the skill is active in the tool only
    assert calls[1]["adapters"][0].kind == "skill"
    assert "translate_to_french" in calls[0]["prompt"][0]["content"]  # the schema reached the agent's model
