"""``hyperlora serve`` end to end: a local Ray (2 CPUs), the app deployed, real HTTP requests.

One Ray instance and one deployment serve the whole module (Ray starts slowly on two shared
cores). Expected answers are computed in this process with the same tiny model and the adapters
read back from the store, so every test checks that the request reached the right adapter.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("ray.serve", reason="the [serve] extra (ray[serve]) is not installed")

from serving_support import SPEC, free_port, get, post, snapshot, sse_events, start_local_ray  # noqa: E402

from hyperlora_integrations.adapters import AdapterStore, InternalizedCorpus  # noqa: E402
from hyperlora_integrations.serving import ModelSpec, ServeConfig, ServingEngine  # noqa: E402
from hyperlora_integrations.serving.schemas import CompletionRequest  # noqa: E402

DOCS = [
    "The lighthouse keeper on Vell island is named Orsolya.",
    "Quartz clocks drift about a second a week.",
    "The harbour of Tessaly freezes every February.",
]
QUESTION = "Who keeps the lighthouse?"
BASE = "tiny-random-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from hyperlora_integrations.serving import server as serving_server

    store_dir = tmp_path_factory.mktemp("serve") / "store"
    ray = start_local_ray(num_cpus=2)
    config = ServeConfig(
        store=str(store_dir),
        model=ModelSpec(**SPEC),
        replica_num_cpus=0.5,
        max_prompt_tokens=256,
        max_request_bytes=64 * 1024,
        max_adapters_per_replica=2,
    )
    try:
        url = serving_server.start(config, port=free_port())
        yield url, store_dir
    finally:
        try:
            serving_server.stop()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local():
    """The served model, loaded here too: the source of expected answers."""
    return ModelSpec(**SPEC).load()


@pytest.fixture(scope="module")
def doc_ids(server):
    url, _ = server
    status, body = post(
        f"{url}/documents", {"documents": [{"text": t, "metadata": {"i": i}} for i, t in enumerate(DOCS)]}
    )
    assert status == 200, body
    assert len(body["ids"]) == 3 and body["queued"] == []
    return body["ids"]


def expected(local, store_dir, ids, prompt=QUESTION, max_new_tokens=8) -> str:
    with AdapterStore(store_dir) as store:
        adapters = [store.get(i) for i in ids]
    return local.generate(prompt, adapters, max_new_tokens=max_new_tokens)


def ask(url, model, content=QUESTION, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    return post(f"{url}/chat/completions", body)


def test_documents_become_models_that_answer_with_their_adapter(server, doc_ids, local):
    url, store_dir = server
    listed = {card["id"]: card for card in get(f"{url}/models")["data"]}
    assert BASE in listed and all(listed[i]["status"] == "ready" for i in doc_ids)
    assert get(f"{url}/models/{doc_ids[0]}")["kind"] == "document"
    status, body = ask(url, doc_ids[0])
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected(local, store_dir, [doc_ids[0]])
    assert body["model"] == doc_ids[0] and body["hyperlora"]["adapters"] == [doc_ids[0]]
    assert body["usage"]["completion_tokens"] == 8
    status, base = ask(url, BASE)
    assert base["choices"][0]["message"]["content"] == expected(local, store_dir, [])
    assert base["choices"][0]["message"]["content"] != body["choices"][0]["message"]["content"]


def test_two_adapters_in_flight_at_once_get_their_own_answers(server, doc_ids, local):
    """Six requests over three adapters (the replica's LRU holds two) sent at once."""
    url, store_dir = server
    want = {i: expected(local, store_dir, [i]) for i in doc_ids}
    assert len(set(want.values())) == 3
    got: dict[int, tuple[str, str]] = {}

    def call(k: int, adapter_id: str) -> None:
        status, body = ask(url, adapter_id)
        got[k] = (adapter_id, body["choices"][0]["message"]["content"] if status == 200 else f"{status} {body}")

    threads = [threading.Thread(target=call, args=(k, doc_ids[k % 3])) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 6
    for adapter_id, text in got.values():
        assert text == want[adapter_id]


def test_adapters_field_activates_several(server, doc_ids, local):
    url, store_dir = server
    status, body = ask(url, doc_ids[0], adapters=[doc_ids[1]])
    assert status == 200 and body["hyperlora"]["adapters"] == doc_ids[:2]
    assert body["choices"][0]["message"]["content"] == expected(local, store_dir, doc_ids[:2])


def test_streaming_matches_the_whole_answer(server, doc_ids, local):
    url, store_dir = server
    status, text = ask(url, doc_ids[1], stream=True, stream_options={"include_usage": True})
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1] if e["choices"])
    assert content == expected(local, store_dir, [doc_ids[1]])
    assert [e["choices"][0]["finish_reason"] for e in events[1:-1] if e["choices"]][-1] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 8


def test_completions_endpoint(server, doc_ids, local):
    url, store_dir = server
    status, body = post(f"{url}/completions", {"model": doc_ids[0], "prompt": "The keeper is", "max_tokens": 6})
    assert status == 200, body
    with AdapterStore(store_dir) as store:
        engine = ServingEngine(local, store)
        req = CompletionRequest(model=doc_ids[0], prompt="The keeper is", max_tokens=6)
        targets = engine.targets(req.model)
        plan = engine.plan(req, targets, [engine.load(t) for t in targets])
        want = "".join(c.text for c in engine.run(plan))
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == want


def test_signed_reference_in_a_message_works_as_in_chat_hyperlora(server, doc_ids, local):
    url, store_dir = server
    with AdapterStore(store_dir) as store:
        ref = InternalizedCorpus(local, store).search("lighthouse keeper Orsolya", k=1)[0]
    status, body = ask(url, BASE, content=f"{ref.reference} {QUESTION}")
    assert status == 200 and body["hyperlora"]["adapters"] == [ref.adapter_id]
    want = expected(local, store_dir, [ref.adapter_id], prompt=f" {QUESTION}")
    assert body["choices"][0]["message"]["content"] == want


def test_bad_requests_get_openai_errors_and_leave_the_store_alone(server, doc_ids):
    url, store_dir = server
    before = snapshot(store_dir)
    cases = [
        (ask(url, "no-such-adapter"), 404, "model_not_found"),
        (post(f"{url}/chat/completions", None, raw=b'{"model": "x", "messages": [}'), 400, "invalid_json"),
        (post(f"{url}/chat/completions", {"model": BASE}), 400, "invalid_request"),
        (ask(url, BASE, content="word " * 400), 400, "context_length_exceeded"),
        (ask(url, BASE, content="x" * 70_000), 413, "request_too_large"),
        (post(f"{url}/documents", {"documents": [{"text": "fine"}, {"text": "  "}]}), 400, "invalid_request"),
        (post(f"{url}/documents", {"documents": [{"text": "fine"}], "consolidate": "later"}), 400, "invalid_request"),
        (ask(url, doc_ids[0], adapters=["missing"]), 404, "model_not_found"),
    ]
    for (status, body), want_status, code in cases:
        assert status == want_status, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    assert snapshot(store_dir) == before


def test_langchain_chat_openai_works_unchanged(server, doc_ids, local):
    langchain_openai = pytest.importorskip("langchain_openai")
    url, store_dir = server
    llm = langchain_openai.ChatOpenAI(
        base_url=url, api_key="unused", model=doc_ids[2], temperature=0, max_tokens=8, max_retries=0
    )
    want = expected(local, store_dir, [doc_ids[2]])
    assert llm.invoke(QUESTION).content == want
    assert "".join(chunk.content for chunk in llm.stream(QUESTION)) == want
    with pytest.raises(langchain_openai.chat_models.base.openai.NotFoundError):
        llm.model_copy(update={"model_name": "no-such-adapter"}).invoke(QUESTION)


def test_llamaindex_openai_like_works_unchanged(server, doc_ids, local):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    url, store_dir = server
    llm = openai_like.OpenAILike(
        model=doc_ids[2], api_base=url, api_key="unused", is_chat_model=True, max_tokens=8, temperature=0.0
    )
    reply = llm.chat([ChatMessage(role="user", content=QUESTION)])
    assert reply.message.content == expected(local, store_dir, [doc_ids[2]])
    completer = openai_like.OpenAILike(model=BASE, api_base=url, api_key="unused", max_tokens=6, temperature=0.0)
    status, body = post(f"{url}/completions", {"model": BASE, "prompt": "Once upon", "max_tokens": 6})
    assert completer.complete("Once upon").text == body["choices"][0]["text"]


def test_ingest_on_ray_data_fills_the_served_store_and_resumes(server, doc_ids, tmp_path):
    """20 new documents (text files, JSONL, parquet) ingested by an actor into the store being
    served; the three already there (posted over HTTP) are skipped, and a rerun does nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hyperlora_integrations.adapters import document_id
    from hyperlora_integrations.serving import ingest

    url, store_dir = server
    texts = [f"Ingested note {i}: the code word is {'alpha beta gamma delta'.split()[i % 4]}-{i}." for i in range(20)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(texts[i], encoding="utf-8")
    for i, text in enumerate(DOCS):  # already stored by the doc_ids fixture
        (corpus / f"posted{i}.md").write_text(text, encoding="utf-8")
    (corpus / "more.jsonl").write_text(
        "".join(f'{{"text": "{t}", "metadata": {{"n": {i}}}}}\n' for i, t in enumerate(texts[8:14])), encoding="utf-8"
    )
    pq.write_table(pa.table({"text": texts[14:], "topic": ["x"] * 6}), corpus / "rest.parquet")
    spec = ModelSpec(**SPEC)
    report = ingest([corpus], store_dir, spec=spec, batch_size=5, num_cpus=0.5, progress=False)
    assert (report.total, report.skipped, report.written, report.failed) == (23, 3, 20, {})
    listed = {card["id"] for card in get(f"{url}/models")["data"]}
    assert {document_id("default", t) for t in texts} <= listed
    with AdapterStore(store_dir) as store:
        meta = store.metadata(document_id("default", texts[15]))
        assert meta.user_metadata["topic"] == "x" and meta.kind == "document"
        assert store.metadata(document_id("default", texts[9])).user_metadata["n"] == 1
    again = ingest([corpus], store_dir, spec=spec, num_cpus=0.5, progress=False)
    assert (again.total, again.skipped, again.written) == (23, 23, 0)
