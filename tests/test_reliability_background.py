"""Background internalization ("sleep mode") in one process: immediate ids, answers by context
until the adapter lands, oldest-first order, skills after documents, cancellation, failures,
progress, and exactly-once processing with several workers. The kill -9 version of the queue's
persistence is ``test_store_processes.py::test_queue_survives_sigkill_nothing_lost_nothing_done_twice``.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hyperlora_integrations.adapters import AdapterStore, InternalizedCorpus, ReferenceResolver
from hyperlora_integrations.adapters.worker import drain
from hyperlora_integrations.chat import encode_text
from hyperlora_integrations.errors import AdapterNotFoundError, InvalidInputError
from hyperlora_integrations.skills import SkillLibrary

FESTIVAL = "The Zorblax lantern festival is held in the town of Quendor every ninth of March."
PEAK = "Mount Vellic, the highest peak of the Arnath range, rises 5,120 meters above sea level."
SHIP = "Captain Mirelle Oduya commanded the research vessel Halcyon Drift during the 2031 survey."


class Gate:
    """Holds every call of ``model.<method>`` until opened, recording the order of calls."""

    def __init__(self, monkeypatch, model, method: str = "internalize") -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.calls: list[str] = []
        original = getattr(model, method)

        def held(text, **kwargs):
            self.calls.append(text)
            self.entered.set()
            assert self.opened.wait(30), "gate never opened"
            return original(text, **kwargs)

        monkeypatch.setattr(model, method, held)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture()
def gate(monkeypatch, tiny_model, store):
    g = Gate(monkeypatch, tiny_model)
    yield g
    g.open()  # never leave a worker thread blocked behind the test


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def contains_run(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_add_returns_at_once_then_context_then_adapter(tiny_model, store, gate):
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    t0 = time.monotonic()
    ids = corpus.add_texts([FESTIVAL, PEAK, SHIP], [{"source": "a"}, {"source": "b"}, {"source": "c"}], background=True)
    assert time.monotonic() - t0 < 1.0
    assert corpus.pending() == ids and len(set(ids)) == 3
    assert ids == InternalizedCorpus(tiny_model, AdapterStore(store.path), namespace="docs").pending()

    hit = corpus.search("When is the Zorblax lantern festival?", k=1)[0]
    assert hit.adapter_id == ids[0] and hit.metadata == {"source": "a"} and "Zorblax" in hit.excerpt
    resolver = ReferenceResolver(store, namespaces=["docs"])
    question = f"{hit.reference}\nWhen is the festival held?"
    before = resolver.resolve([{"role": "user", "content": question}])
    assert before.served_by == {ids[0]: "context"} and before.adapters == []
    assert FESTIVAL in before.messages[0]["content"] and "hyperlora-ref" not in before.messages[0]["content"]
    prompt = tiny_model.encode(before.messages)
    assert contains_run(prompt, encode_text(tiny_model.tokenizer, FESTIVAL))  # the text reached the prompt
    assert tiny_model.complete(before.messages, before.adapters, max_new_tokens=2).completion_tokens >= 1

    gate.open()
    corpus.drain(timeout=30)
    assert corpus.pending() == [] and store.verify() == []
    after = resolver.resolve([{"role": "user", "content": question}])
    assert after.served_by == {ids[0]: "instant"} and [a.id for a in after.adapters] == [ids[0]]
    assert FESTIVAL not in after.messages[0]["content"]
    assert "Zorblax" not in tiny_model.tokenizer.decode(tiny_model.encode(after.messages))
    # the adapter is the one a foreground add would have made
    direct = tiny_model.internalize(FESTIVAL)
    assert torch.allclose(after.adapters[0].A["down_proj"], direct.A["down_proj"])
    assert store.metadata(ids[0], namespace="docs").user_metadata == {"source": "a"}


def test_documents_oldest_first_and_skills_only_when_no_document_waits(tiny_model, store, gate, monkeypatch):
    skill_calls = []
    original = tiny_model.generate_skill
    monkeypatch.setattr(tiny_model, "generate_skill", lambda d: skill_calls.append((len(gate.calls), d)) or original(d))
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    corpus.add_texts(["first document"], background=True)
    gate.entered.wait(10)  # the worker is busy with it
    skills = SkillLibrary(tiny_model, store)
    skills.add("poet", "Write every answer as a short poem.", background=True)
    docs = [f"document number {i}" for i in range(2, 7)]
    for d in docs:  # one call each: distinct enqueue times
        corpus.add_texts([d], background=True)
    gate.open()
    drain(corpus, progress=False, timeout=30)
    assert gate.calls == ["first document", *docs]
    assert skill_calls == [(6, "Write every answer as a short poem.")]  # after all six documents
    assert skills.names() == ["poet"]


def test_delete_cancels_queued_and_running_documents(tiny_model, store, gate):
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    ids = corpus.add_texts([FESTIVAL, PEAK, SHIP], background=True)
    gate.entered.wait(10)  # FESTIVAL is running, the others queued
    corpus.delete(ids[:2])
    with pytest.raises(AdapterNotFoundError):
        corpus.delete(ids[:1])
    gate.open()
    corpus.drain(timeout=30)
    assert [m.id for m in store.list(namespace="docs")] == [ids[2]]
    assert [h.adapter_id for h in corpus.search("Zorblax Vellic Mirelle")] == [ids[2]]
    assert store.verify() == []


def test_failed_document_is_parked_served_by_context_and_retryable(tiny_model, store, monkeypatch):
    monkeypatch.setattr(tiny_model.d2l.config, "max_document_tokens", 8)
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    (doc_id,) = corpus.add_texts([FESTIVAL], background=True)
    corpus.drain(timeout=30)
    assert corpus.pending() == [] and "DocumentTooLargeError" in corpus.failed()[doc_id]
    ref = corpus.search("Zorblax")[0].reference
    res = ReferenceResolver(store, namespaces=["docs"]).resolve_text(ref)
    assert res.served_by == {doc_id: "context"} and FESTIVAL in res.messages[0]["content"]
    monkeypatch.setattr(tiny_model.d2l.config, "max_document_tokens", 1_000_000)
    assert store.retry_failed() == 1
    corpus.drain(timeout=30)
    assert corpus.failed() == {} and store.contains(doc_id, namespace="docs")


def test_long_pending_document_contributes_only_its_best_passages(tiny_model, store, gate):
    filler = [f"Paragraph {i} talks about weather patterns and crop rotation in region {i}." for i in range(300)]
    filler[217] = FESTIVAL
    doc = "\n".join(filler)
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    corpus.add_texts([doc], background=True)
    ref = corpus.search("Zorblax lantern festival")[0].reference
    resolver = ReferenceResolver(store, namespaces=["docs"], fallback_chars=1500)
    res = resolver.resolve_text(f"{ref} When is the Zorblax lantern festival?")
    content = res.messages[0]["content"]
    assert len(doc) > 20_000 and len(content) < 1700 and FESTIVAL in content
    no_match = resolver.resolve_text(f"{ref} ???")
    assert no_match.messages[0]["content"].startswith("Paragraph 0")


def test_queue_is_shared_by_a_reopened_store_and_finished_once(tiny_model, store, gate, monkeypatch):
    commits = []
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    ids = corpus.add_texts([FESTIVAL, PEAK, SHIP], background=True)
    gate.entered.wait(10)  # worker 1 holds FESTIVAL
    other_store = AdapterStore(store.path)  # as after a restart, or from another process
    original = other_store.complete
    monkeypatch.setattr(other_store, "complete", lambda job, a, **kw: commits.append(job.id) or original(job, a, **kw))
    reopened = InternalizedCorpus(tiny_model, other_store, namespace="docs")
    assert reopened.pending() == ids
    assert {h.adapter_id for h in reopened.search("Zorblax Vellic Mirelle", k=5)} == set(ids)
    threading.Timer(0.5, gate.open).start()
    reopened.drain(timeout=30)  # does what worker 1 has not claimed, waits for what it has
    assert reopened.pending() == [] and sorted(m.id for m in store.list(namespace="docs")) == sorted(ids)
    assert ids[0] not in commits and len(commits) == len(set(commits))
    assert len(gate.calls) == 3  # each document internalized exactly once
    other_store.close()


def test_many_workers_process_each_job_exactly_once(tiny_model, tmp_path, monkeypatch):
    calls = []
    lock = threading.Lock()
    original = tiny_model.internalize

    def counted(text, **kw):
        with lock:
            calls.append(text)
        return original(text, **kw)

    monkeypatch.setattr(tiny_model, "internalize", counted)
    stores = [AdapterStore(tmp_path / "s") for _ in range(3)]
    docs = [f"Shared queue document {i} about topic {i * 13}." for i in range(24)]
    InternalizedCorpus(tiny_model, stores[0], namespace="docs").add_texts(docs, background=True)  # + its thread
    threads = [
        threading.Thread(target=drain, args=(s,), kwargs={"model": tiny_model, "progress": False}) for s in stores[1:]
    ]
    for t in threads:
        t.start()
    drain(stores[0], model=tiny_model, progress=False, timeout=60)
    for t in threads:
        t.join(60)
    assert sorted(calls) == sorted(docs)  # no document internalized twice
    assert len(stores[0].list(namespace="docs")) == 24 and stores[0].verify() == []
    for s in stores:
        s.close()


def test_drain_shows_progress(tiny_model, store, capfd):
    corpus = InternalizedCorpus(tiny_model, store, namespace="docs")
    corpus.worker.stop()  # keep the thread out of it: this call does all the work
    store.enqueue("document", "d1", FESTIVAL, namespace="docs")
    store.enqueue("document", "d2", PEAK, namespace="docs")
    store.enqueue("document", "d3", SHIP, namespace="docs")
    assert drain(corpus, progress=True) == 3
    err = capfd.readouterr().err
    assert "internalizing queue" in err and "3/3" in err
    with pytest.raises(InvalidInputError):
        drain(store)  # a store alone does not say which model does the work
    with pytest.raises(InvalidInputError):
        drain("not a corpus")


def test_skill_queued_in_background(tiny_model, store, monkeypatch):
    g = Gate(monkeypatch, tiny_model, "generate_skill")
    lib = SkillLibrary(tiny_model, store)
    try:
        skill_id = lib.add("french", "Translate the user's message into French.", background=True)
        assert isinstance(skill_id, str) and lib.pending() == ["french"]
        assert lib.route("translate into French please", threshold=-1.0) is None  # not generated yet
        with pytest.raises(AdapterNotFoundError):
            lib.get("french")
        g.open()
        drain(lib, progress=False, timeout=30)
        assert lib.pending() == [] and lib.names() == ["french"]
        assert lib.get("french").adapter.id == skill_id
        assert lib.route("translate into French please", threshold=-1.0).name == "french"
        assert SkillLibrary(tiny_model, AdapterStore(store.path)).get("french").adapter.id == skill_id
        # queued again under a new description, then replaced in the foreground: the latest add wins
        # whether the worker has not started, is running or has finished the queued one
        lib.add("french", "Answer in formal French.", background=True)
        lib.add("french", "Answer in casual French.")
        drain(lib, progress=False, timeout=30)
        assert lib.get("french").description == "Answer in casual French." and len(store.list(namespace="skills")) == 1
    finally:
        g.open()


def test_refresh_sees_documents_added_elsewhere_and_readding_retries_a_failure(tiny_model, store, monkeypatch):
    here = InternalizedCorpus(tiny_model, store, namespace="docs")
    there = InternalizedCorpus(tiny_model, AdapterStore(store.path), namespace="docs")  # another process
    (stored,) = there.add_texts([PEAK])
    monkeypatch.setattr(there.worker, "start", lambda: there.worker)
    (queued,) = there.add_texts([SHIP], background=True)
    assert here.search("Vellic Mirelle") == []
    here.refresh()
    assert {h.adapter_id for h in here.search("Vellic Mirelle", k=5)} == {stored, queued}
    there.store.remove(stored, namespace="docs")  # deleted elsewhere: search drops it, never raises
    assert [h.adapter_id for h in here.search("Vellic Mirelle", k=5)] == [queued]
    monkeypatch.setattr(tiny_model.d2l.config, "max_document_tokens", 4)
    there.drain(timeout=30)
    assert list(there.failed()) == [queued]
    monkeypatch.setattr(tiny_model.d2l.config, "max_document_tokens", 1_000_000)
    assert there.add_texts([SHIP], background=True) == [queued] and there.pending() == [queued]
    there.drain(timeout=30)
    assert there.failed() == {} and store.contains(queued, namespace="docs")
    there.store.close()
