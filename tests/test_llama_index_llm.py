"""HyperLoRALLM on the tiny model: the LlamaIndex LLM interface, sync and async, and its metadata."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
from llama_index_support import ActiveLoRARecorder, CoreCallSpy

pytest.importorskip("llama_index.core")

from llama_index.core import Settings  # noqa: E402
from llama_index.core.base.llms.types import ImageBlock, TextBlock  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402

from hyperlora_integrations.errors import InvalidInputError  # noqa: E402
from hyperlora_integrations.llama_index import HyperLoRALLM  # noqa: E402

N = 6  # new tokens per call: enough to exercise streaming, cheap on two cores


@pytest.fixture()
def llm(tiny_model):
    return HyperLoRALLM(tiny_model, max_new_tokens=N)


@pytest.fixture()
def skill(tiny_model):
    return tiny_model.generate_skill("Answer every question in French.")


def chat_messages() -> list[ChatMessage]:
    return [
        ChatMessage(role=MessageRole.SYSTEM, content="You are terse."),
        ChatMessage(role=MessageRole.USER, content="Name a color."),
        ChatMessage(role=MessageRole.ASSISTANT, content="Blue."),
        ChatMessage(role=MessageRole.USER, content="Another one?"),
    ]


CORE_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


def test_import_does_not_pull_llama_index():
    code = (
        "import sys, hyperlora_integrations, hyperlora_integrations.adapters, hyperlora_integrations.skills;"
        "bad = sorted(m for m in sys.modules if m.startswith('llama_index'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_metadata_is_the_models(llm, tiny_model):
    meta = llm.metadata
    assert meta.context_window == tiny_model.max_context
    assert meta.num_output == N
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is True  # tool calls decoded under a grammar (issue #21)
    assert meta.model_name == tiny_model.name


def test_context_window_is_validated_and_enforced(tiny_model):
    with pytest.raises(InvalidInputError):
        HyperLoRALLM(tiny_model, context_window=tiny_model.max_context + 1)
    with pytest.raises(InvalidInputError):
        HyperLoRALLM(tiny_model, context_window=64, max_new_tokens=64)
    small = HyperLoRALLM(tiny_model, context_window=64, max_new_tokens=4)
    assert small.metadata.context_window == 64
    small.complete("hi")  # fits
    with pytest.raises(InvalidInputError, match="context_window=64"):
        small.complete("word " * 80)


def test_complete_matches_core_and_reports_usage(llm, tiny_model):
    response = llm.complete("Tell me about rivers.")
    expected = tiny_model.complete("Tell me about rivers.", max_new_tokens=N)
    assert response.text == expected.text
    usage = response.raw["usage"]
    assert usage["prompt_tokens"] == len(tiny_model.encode("Tell me about rivers."))
    assert usage["completion_tokens"] == expected.completion_tokens
    assert response.raw["finish_reason"] == expected.finish_reason
    assert response.raw["adapters"] == [] and response.additional_kwargs["rejected_references"] == 0
    assert response.additional_kwargs["prompt_tokens"] == usage["prompt_tokens"]


def test_system_prompt_is_applied(tiny_model):
    llm = HyperLoRALLM(tiny_model, max_new_tokens=N, system_prompt="Be brief.")
    response = llm.complete("Hi")
    expected = tiny_model.complete([{"role": "user", "content": "Hi"}], system="Be brief.", max_new_tokens=N)
    assert response.text == expected.text
    assert response.raw["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_stream_complete_concatenates_to_complete(llm):
    chunks = list(llm.stream_complete("Tell me about rivers."))
    assert "".join(c.delta for c in chunks) == llm.complete("Tell me about rivers.").text
    assert chunks[-1].text == "".join(c.delta for c in chunks)
    assert chunks[-1].raw["usage"]["completion_tokens"] > 0
    assert all(c.raw is None for c in chunks[:-1])


def test_chat_matches_core_with_roles(llm, tiny_model):
    response = llm.chat(chat_messages())
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == tiny_model.generate(CORE_CHAT, max_new_tokens=N)
    assert response.raw["usage"]["prompt_tokens"] == len(tiny_model.encode(CORE_CHAT))


def test_stream_chat(llm):
    full = llm.chat(chat_messages()).message.content
    chunks = list(llm.stream_chat(chat_messages()))
    assert "".join(c.delta for c in chunks) == full
    assert chunks[-1].message.content == full


def test_sampling_kwargs_per_call(llm, tiny_model):
    a = llm.complete("Say something.", temperature=1.0, seed=7, max_tokens=4)
    b = llm.complete("Say something.", temperature=1.0, seed=7, max_new_tokens=4)
    expected = tiny_model.generate("Say something.", temperature=1.0, seed=7, max_new_tokens=4)
    assert a.text == b.text == expected
    assert a.raw["usage"]["completion_tokens"] <= 4


def test_bad_arguments_are_refused(llm):
    with pytest.raises(TypeError, match="tolls"):  # tools= is an argument now (function calling); a typo is not
        llm.complete("hi", tolls=[])
    with pytest.raises(InvalidInputError):
        llm.complete("hi", max_new_tokens=0)
    with pytest.raises(InvalidInputError):
        llm.complete("hi", adapters=["not an adapter"])
    image = ChatMessage(role="user", blocks=[TextBlock(text="what is this?"), ImageBlock(url="http://x/y.png")])
    with pytest.raises(InvalidInputError, match="text-only"):
        llm.chat([image])


def test_explicit_adapters_are_active(llm, tiny_model, skill):
    with ActiveLoRARecorder(tiny_model) as rec:
        response = llm.complete("Good morning", adapters=[skill])
    rec.assert_exactly([skill])
    assert response.raw["adapters"] == [skill.id]
    assert response.text == tiny_model.generate("Good morning", [skill], max_new_tokens=N)
    with ActiveLoRARecorder(tiny_model) as rec:
        llm.complete("Good morning")
    rec.assert_exactly([])


async def test_async_variants_match_sync(llm):
    prompt = "Tell me about rivers."
    assert (await llm.acomplete(prompt)).text == llm.complete(prompt).text
    assert (await llm.achat(chat_messages())).message.content == llm.chat(chat_messages()).message.content
    deltas = [c.delta async for c in await llm.astream_complete(prompt)]
    assert "".join(deltas) == llm.complete(prompt).text
    chunks = [c async for c in await llm.astream_chat(chat_messages())]
    assert chunks[-1].message.content == llm.chat(chat_messages()).message.content
    assert chunks[-1].raw["usage"]["completion_tokens"] > 0


async def test_async_runs_off_the_event_loop(llm, tiny_model, monkeypatch):
    spy = CoreCallSpy().install(monkeypatch, tiny_model)
    loop_thread = threading.get_ident()
    await llm.acomplete("hello")
    async for _ in await llm.astream_chat(chat_messages()):
        pass
    assert len(spy.calls) == 2
    assert all(call.thread != loop_thread for call in spy.calls)


async def test_concurrent_calls_keep_their_own_adapters(llm, tiny_model, skill):
    other = tiny_model.generate_skill("Count the words of the input.")
    prompt = "The quick brown fox."
    with_skill, with_other, bare = await asyncio.gather(
        llm.acomplete(prompt, adapters=[skill]),
        llm.acomplete(prompt, adapters=[other]),
        llm.acomplete(prompt),
    )
    assert with_skill.text == tiny_model.generate(prompt, [skill], max_new_tokens=N)
    assert with_other.text == tiny_model.generate(prompt, [other], max_new_tokens=N)
    assert bare.text == tiny_model.generate(prompt, max_new_tokens=N)
    assert (with_skill.raw["adapters"], with_other.raw["adapters"], bare.raw["adapters"]) == (
        [skill.id],
        [other.id],
        [],
    )


async def test_abandoned_async_stream_stops_generating(tiny_model, monkeypatch):
    llm = HyperLoRALLM(tiny_model, max_new_tokens=200, temperature=1.0, seed=3)
    produced = []
    original = tiny_model.stream_chunks

    def counting(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            produced.append(chunk)
            yield chunk

    monkeypatch.setattr(tiny_model, "stream_chunks", counting)
    stream = await llm.astream_complete("Write a long story.")
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.sleep(0.5)
    seen = len(produced)
    await asyncio.sleep(0.5)
    assert len(produced) == seen < 50


def test_works_as_settings_llm(llm, tiny_model):
    previous = Settings._llm
    try:
        Settings.llm = llm
        assert Settings.llm is llm
        out = Settings.llm.predict(PromptTemplate("Give a synonym of {word}."), word="big")
        assert out == tiny_model.generate("Give a synonym of big.", max_new_tokens=N)
    finally:
        Settings._llm = previous


def test_token_counting_handler_reads_exact_counts(tiny_model):
    counter = TokenCountingHandler()
    llm = HyperLoRALLM(tiny_model, max_new_tokens=N, callback_manager=CallbackManager([counter]))
    response = llm.chat(chat_messages())
    assert counter.prompt_llm_token_count == response.raw["usage"]["prompt_tokens"]
    assert counter.completion_llm_token_count == response.raw["usage"]["completion_tokens"]
