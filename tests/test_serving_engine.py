"""The serving rules without Ray or HTTP: names, references, lengths, errors, documents.

The tiny model's hypernet scales are turned up so every adapter visibly changes greedy output;
expected answers come from ``HyperLoRAModel.generate`` with the same adapters.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from hyperlora_integrations.adapters import AdapterStore, InternalizedCorpus
from hyperlora_integrations.errors import AdapterNotFoundError, EmptyDocumentError, InvalidInputError
from hyperlora_integrations.serving import ContextLengthExceededError, ModelSpec, ServingEngine
from hyperlora_integrations.serving.ingest import _files, _row
from hyperlora_integrations.serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DocumentsRequest,
    RequestTooLargeError,
    error_for,
    validation_error,
)

DOCS = ["The lighthouse keeper on Vell island is named Orsolya.", "Quartz clocks drift about a second a week."]
QUESTION = "Who keeps the lighthouse?"


@pytest.fixture(scope="module")
def model():
    return ModelSpec(tiny=True, tiny_adapter_scale=20.0).load()


@pytest.fixture()
def engine(model, tmp_path):
    store = AdapterStore(tmp_path / "store")
    yield ServingEngine(model, store, max_prompt_tokens=400)
    store.close()


def chat(engine: ServingEngine, body: dict) -> tuple[str, dict]:
    req = ChatCompletionRequest.model_validate({"max_tokens": 8, **body})
    targets = engine.targets(req.model, req.adapters)
    plan = engine.plan(req, targets, [engine.load(t) for t in targets if t.text is None])
    return "".join(c.text for c in engine.run(plan)), plan.info()


def snapshot(store: AdapterStore) -> tuple:
    rows = []
    for ns in store.namespaces():
        rows += [(ns, m.model_dump_json()) for m in store.list(namespace=ns)]
    jobs = [(j.namespace, j.id, j.state) for j in store.jobs(states=("queued", "running", "failed"))]
    files = sorted(str(p.relative_to(store.path)) for p in (store.path / "blobs").rglob("*"))
    return rows, jobs, files


def messages(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_document_ids_are_model_values_with_their_own_answers(engine, model):
    ids = engine.add_documents(DocumentsRequest(documents=[{"text": t} for t in DOCS]))["ids"]
    answers = {}
    for adapter_id in ids:
        text, info = chat(engine, {"model": adapter_id, "messages": messages()})
        expected = model.generate(QUESTION, [engine.store.get(adapter_id)], max_new_tokens=8)
        assert text == expected
        assert info["served_by"] == {f"default/{adapter_id}": "adapter"}
        answers[adapter_id] = text
    base, info = chat(engine, {"model": engine.base_name, "messages": messages()})
    assert info["adapters"] == [] and base == model.generate(QUESTION, max_new_tokens=8)
    assert len({base, *answers.values()}) == 3  # each adapter changes the answer differently


def test_adapters_field_and_namespaced_names_combine(engine, model):
    a, b = engine.add_documents(DocumentsRequest(documents=[{"text": t} for t in DOCS]))["ids"]
    text, info = chat(engine, {"model": f"default/{a}", "adapters": [b], "messages": messages()})
    assert info["adapters"] == [a, b]
    assert text == model.generate(QUESTION, [engine.store.get(a), engine.store.get(b)], max_new_tokens=8)


def test_skill_is_named_by_its_skill_name(engine, model):
    adapter = model.generate_skill("Answer in French.")
    adapter.metadata.kind = "skill"
    adapter.metadata.skill_name = "french"
    engine.store.put(adapter, namespace="skills")
    (target,) = engine.targets("french")
    assert (target.namespace, target.id) == ("skills", adapter.id)
    assert any(c["id"] == f"skills/{adapter.id}" and c.get("name") == "french" for c in engine.models())


def test_unknown_names_are_404_and_foreign_namespaces_are_not_served(engine, tmp_path):
    other = engine.store
    adapter = engine.model.internalize(DOCS[0])
    other.put(adapter, namespace="tenant-b")  # stored, but not a namespace this engine serves
    for name in ("nope", f"tenant-b/{adapter.id}", "../etc", "default/", "x" * 300):
        with pytest.raises(AdapterNotFoundError):
            engine.targets(name)
    status, body = error_for(AdapterNotFoundError("x"))
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_signed_reference_in_a_message_activates_its_adapter(engine, model):
    corpus = InternalizedCorpus(model, engine.store)
    (doc_id,) = corpus.add_texts([DOCS[0]])
    ref = corpus.search("lighthouse keeper", k=1)[0].reference
    text, info = chat(engine, {"model": engine.base_name, "messages": messages(f"{ref} {QUESTION}")})
    assert info["adapters"] == [doc_id] and info["rejected_references"] == 0
    assert text == model.generate(messages(f" {QUESTION}"), [engine.store.get(doc_id)], max_new_tokens=8)
    forged = ref[:-5] + "0000]"
    _, info = chat(engine, {"model": engine.base_name, "messages": messages(f"{forged} {QUESTION}")})
    assert info["adapters"] == [] and info["rejected_references"] == 1


def test_background_consolidation_serves_at_once(engine, model, monkeypatch):
    from hyperlora_integrations.adapters import worker

    monkeypatch.setattr(worker.BackgroundWorker, "start", lambda self: self)  # keep the job queued
    out = engine.add_documents(DocumentsRequest(documents=[{"text": DOCS[1]}], consolidate="background"))
    (doc_id,) = out["ids"]
    card = next(c for c in engine.models() if c["id"] == doc_id)
    if out["consolidate"] == "background":  # the instant adapter now, its consolidation queued
        assert (out["queued"], out["consolidating"], card["status"]) == ([], [doc_id], "consolidating")
        served = "adapter"
    else:  # a core without consolidation queues the internalization
        assert (out["queued"], card["status"]) == ([doc_id], "queued")
        served = "context"
    _, info = chat(engine, {"model": doc_id, "messages": messages()})
    assert info["served_by"] == {f"default/{doc_id}": served}


def test_queued_document_is_served_from_its_text(engine, model, monkeypatch):
    from hyperlora_integrations.adapters import worker

    monkeypatch.setattr(worker.BackgroundWorker, "start", lambda self: self)  # keep it queued
    (doc_id,) = InternalizedCorpus(model, engine.store).add_texts([DOCS[1]], background=True)
    assert any(c["id"] == doc_id and c["status"] == "queued" for c in engine.models())
    text, info = chat(engine, {"model": doc_id, "messages": messages()})
    assert info["served_by"] == {f"default/{doc_id}": "context"} and info["adapters"] == []
    assert text == model.generate(QUESTION, context=DOCS[1], max_new_tokens=8)


def test_prompt_over_the_limit_is_a_context_length_error(engine):
    with pytest.raises(ContextLengthExceededError) as exc:
        chat(engine, {"model": engine.base_name, "messages": messages("word " * 600)})
    status, body = error_for(exc.value)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    with pytest.raises(ContextLengthExceededError):  # fits max_prompt_tokens, not the window
        chat(engine, {"model": engine.base_name, "messages": messages(), "max_tokens": engine.model.max_context})


def test_completion_continues_raw_text(engine, model):
    req = CompletionRequest(model=engine.base_name, prompt="Once upon a time", max_tokens=6)
    plan = engine.plan(req, [], [])
    text = "".join(c.text for c in engine.run(plan))
    assert plan.prompt_ids == model.tokenizer("Once upon a time", add_special_tokens=False).input_ids
    assert text and plan.params.max_new_tokens == 6


def test_a_bad_document_leaves_the_store_unchanged(engine):
    engine.add_documents(DocumentsRequest(documents=[{"text": DOCS[0]}]))
    before = snapshot(engine.store)
    with pytest.raises(EmptyDocumentError):
        engine.add_documents(DocumentsRequest(documents=[{"text": DOCS[1]}, {"text": "   "}]))
    assert snapshot(engine.store) == before


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_malformed_chat_bodies_name_the_bad_field(body, param):
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate(body)
    status, err = validation_error(exc.value)
    assert status == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"


def test_openai_client_fields_are_accepted_or_refused_clearly():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}],
            "presence_penalty": 0,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 5,
        }
    )
    assert req.messages[0].core() == {"role": "system", "content": "be brief"} and req.new_tokens() == 5
    image = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    )
    with pytest.raises(InvalidInputError, match="image_url"):
        image.messages[0].core()
    assert error_for(RequestTooLargeError("big"))[0] == 413
    assert error_for(RuntimeError("secret path /x"))[0] == 500
    assert "/x" not in json.dumps(error_for(RuntimeError("secret path /x"))[1])


def test_corpus_files_and_rows(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n', encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    groups = _files([tmp_path])
    assert [len(groups[k]) for k in ("text", "json", "parquet")] == [1, 1, 0]
    with pytest.raises(InvalidInputError, match="unknown corpus format"):
        _files([tmp_path / "skip.bin"])
    with pytest.raises(InvalidInputError, match="does not exist"):
        _files([tmp_path / "missing"])
    assert _row(b"\xff\xfe", None, "x")["error"].startswith("not UTF-8")
    assert _row("  ", None, "x")["error"] == "empty or whitespace-only document"
    assert json.loads(_row("t", {"k": 1}, "s.txt")["metadata"]) == {"source": "s.txt", "k": 1}


def test_batched_decoding_gives_each_request_its_own_adapters(engine, model):
    """With ``enable_batching`` (what the replicas use) concurrent chat and completion requests
    with different adapters are rows of one batch; each gets its solo answer."""
    import asyncio

    ids = engine.add_documents(DocumentsRequest(documents=[{"text": t} for t in DOCS]))["ids"]
    bodies = [{"model": i, "messages": messages(), "max_tokens": 8} for i in [*ids, engine.base_name]]
    solo = [chat(engine, body)[0] for body in bodies]

    def plan(req):
        targets = engine.targets(req.model, req.adapters)
        return engine.plan(req, targets, [engine.load(t) for t in targets if t.text is None])

    completion = CompletionRequest(model=ids[1], prompt="The keeper is", max_tokens=6)
    solo_completion = "".join(c.text for c in engine.run(plan(completion)))

    async def collect(p):
        return "".join([c.text async for c in engine.astream(p)])

    async def all_at_once():
        plans = [plan(ChatCompletionRequest.model_validate(b)) for b in bodies] + [plan(completion)]
        return await asyncio.gather(*(collect(p) for p in plans))

    scheduler = model.enable_batching(max_batch_size=8)
    try:
        got = asyncio.run(all_at_once())
    finally:
        model.disable_batching()
    assert got == [*solo, solo_completion]
    assert scheduler.stats["max_rows"] >= 2  # they really shared a batch


def test_cli_lists_the_commands_and_refuses_bad_options_before_starting_ray(tmp_path, capsys):
    from hyperlora_integrations.cli import main
    from hyperlora_integrations.serving.cli import ingest_main, serve_main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "ingest" in out
    assert ingest_main([str(tmp_path / "missing"), "--store", str(tmp_path / "s")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert serve_main(["--store", str(tmp_path / "s"), "--namespace", "bad/ns"]) == 2
    assert "invalid namespace" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing was created


def test_serve_cli_passes_adapter_selection_to_the_config(tmp_path, monkeypatch):
    from hyperlora_integrations.serving import server
    from hyperlora_integrations.serving.cli import serve_main

    seen = []
    monkeypatch.setattr(server, "serve_forever", lambda config, **kwargs: seen.append(config.select_adapters))
    args = ["--store", str(tmp_path / "s"), "--tiny"]
    assert serve_main(args) == 0 and serve_main([*args, "--no-select-adapters"]) == 0
    assert seen == [True, False]
