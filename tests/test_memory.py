"""Conversation memory on the tiny model: turns persist, the recent window keeps its budget, turns
past it are queued and served as text until their adapter lands, jobs warm-start from the last
adapter, forget() leaves nothing on disk, and one user's memory never reaches another."""

from __future__ import annotations

import pytest
import torch

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.memory import MemoryConfig, MemoryManager, TurnLog, memory_namespace
from hyperlora_integrations.memory.jobs import render

QUICK = ConsolidationConfig(steps=2, batch_size=2, max_seq_tokens=48, lr=2e-2)
CONFIG = MemoryConfig(
    recent_tokens=48, job_tokens=64, min_job_tokens=24, replay_tokens=24, consolidation=QUICK, background=False
)


def facts(user: str, n: int, start: int = 0) -> list[tuple[str, str]]:
    return [
        (f"{user} note {i}: my locker code is {4100 + i}.", f"Noted, {user}, code {4100 + i}.")
        for i in range(start, start + n)
    ]


def fill(memory, pairs) -> None:
    for user, assistant in pairs:
        memory.add_turn(user, assistant)


@pytest.fixture()
def manager(tiny_model, store):
    m = MemoryManager(tiny_model, store, config=CONFIG)
    yield m
    m.close()


def test_turns_persist_across_new_store_and_manager(tiny_model, tmp_path):
    path = tmp_path / "store"
    store = AdapterStore(path)
    first = MemoryManager(tiny_model, store, config=CONFIG)
    fill(first.memory("ana"), facts("ana", 5))
    first.memory("ana").consolidate_now()
    before = [(t.seq, t.role, t.content) for t in first.memory("ana").turns()]
    adapter_id = first.memory("ana").adapter().id
    first.close()
    store.close()

    store = AdapterStore(path)
    again = MemoryManager(tiny_model, store, config=CONFIG).memory("ana")
    assert [(t.seq, t.role, t.content) for t in again.turns()] == before and len(before) == 10
    assert again.adapter().id == adapter_id and again.watermark > 0
    assert ("ana", None) in MemoryManager(tiny_model, store, config=CONFIG).conversations()
    store.close()


def test_recent_window_respects_the_token_budget(manager, tiny_model):
    memory = manager.memory("ben")
    fill(memory, facts("ben", 6))
    window = memory.recent()
    assert sum(t.tokens for t in window) <= CONFIG.recent_tokens
    assert window[-1].seq == memory.turns()[-1].seq  # the newest turn is always in the window
    older = memory.turns()[-len(window) - 1]
    assert sum(t.tokens for t in window) + older.tokens > CONFIG.recent_tokens  # the window is the longest that fits
    memory.consolidate_now()
    assert memory.prompt_turns() == window  # caught up: only the window is text
    messages, adapters = memory.context()
    assert len(adapters) == 1 and sum(t.tokens for t in memory.prompt_turns()) <= CONFIG.recent_tokens
    # A turn's tokens are what the chat template makes of it.
    whole = len(tiny_model.encode(messages, add_generation_prompt=False))
    bare = len(tiny_model.encode(messages[:1], add_generation_prompt=False)) - window[0].tokens
    assert whole == bare + sum(t.tokens for t in window)


def test_a_huge_latest_message_stays_in_the_window(manager):
    memory = manager.memory("cyd")
    fill(memory, facts("cyd", 2))
    big = memory.add_message("user", "word " * 200)
    assert memory.recent() == [big]


def test_overflow_is_queued_served_as_text_then_by_the_adapter(manager, store):
    memory = manager.memory("dee")
    fill(memory, facts("dee", 1))
    assert store.pending(namespace=memory.namespace) == []  # everything fits: nothing to learn
    fill(memory, facts("dee", 4, start=1))
    [job] = store.pending(namespace=memory.namespace)
    assert job.kind == "consolidate" and job.options["warm_start_from"] is None
    waiting = [t for t in memory.turns() if t.seq < memory.window_start()]
    assert waiting and "4100" in job.payload  # the oldest turns, as a transcript
    # Until the job lands nothing is consolidated, so every turn is still in the prompt as text.
    assert memory.adapters() == [] and memory.prompt_turns() == memory.turns()
    assert memory.status().jobs["queued"] == 1 and memory.status().text_turns == 10
    memory.consolidate_now()
    status = memory.status()
    assert status.jobs == {"queued": 0, "running": 0, "failed": 0}
    assert status.consolidated_through == memory.window_start() - 1 >= waiting[-1].seq
    [adapter] = memory.adapters()
    assert adapter.id == f"mem-{status.consolidated_through}" and adapter.metadata.model_extra["consolidated"]
    assert [t.seq for t in memory.prompt_turns()] == [t.seq for t in memory.recent()]
    assert all(t.seq > status.consolidated_through for t in memory.prompt_turns())
    assert len(store.list(namespace=memory.namespace)) == 1  # superseded generations are removed


def test_jobs_wait_for_min_job_tokens_and_flush_on_demand(manager, store):
    memory = manager.memory("eve")
    waited = False
    for i in range(40):
        memory.add_message("user", f"ok {i}")
        overflow = sum(t.tokens for t in memory.turns() if t.seq < memory.window_start())
        queued = bool(store.pending(namespace=memory.namespace))
        assert queued == (overflow >= CONFIG.min_job_tokens), (i, overflow)
        if 0 < overflow < CONFIG.min_job_tokens:
            waited = True
            assert memory.schedule() is None
            assert memory.schedule(flush=True) is not None  # consolidate_now's way: any size
            break
    assert waited


def test_incremental_jobs_warm_start_from_the_previous_adapter(fresh_tiny_model, store):
    model = fresh_tiny_model
    # lr ~ 0: a warm-started job returns the adapter it started from; a cold one a fresh random A.
    frozen = CONFIG.model_copy(update={"consolidation": QUICK.model_copy(update={"lr": 1e-12, "steps": 1})})
    memory = MemoryManager(model, store, config=frozen).memory("fay")
    fill(memory, facts("fay", 5))
    memory.consolidate_now()
    first = memory.adapter()
    fill(memory, facts("fay", 4, start=5))
    [job] = store.pending(namespace=memory.namespace)
    assert job.options["warm_start_from"] == first.id
    assert job.options["user_metadata"]["memory"]["warm_start_from"] == first.id  # recorded on the adapter
    assert job.options["config"]["chunk_tokens"] == 8192  # never split: a chunk would start from zero
    memory.consolidate_now()
    second = memory.adapter()
    assert second.id != first.id and memory.watermark > int(first.id.split("-")[1])
    fa, fb = first.folded()
    sa, sb = second.folded()
    assert torch.allclose(fa["down_proj"], sa["down_proj"], atol=1e-6)
    assert torch.allclose(fb["down_proj"], sb["down_proj"], atol=1e-6)
    assert [m.id for m in store.list(namespace=memory.namespace)] == [second.id]
    # The start adapter gone behind the memory's back: the job fails instead of starting from
    # zero (which would silently drop every earlier turn), and its turns stay text.
    fill(memory, facts("fay", 4, start=9))
    [job] = store.pending(namespace=memory.namespace)
    store.remove(second.id, namespace=memory.namespace)
    memory.consolidate_now()
    assert memory.status().jobs["failed"] == 1 and "AdapterNotFoundError" in memory.status().errors[0]
    assert memory.watermark == 0 and memory.prompt_turns() == memory.turns()


def test_replay_mixes_earlier_turns_into_later_jobs(manager, store):
    memory = manager.memory("gus")
    fill(memory, facts("gus", 5))
    memory.consolidate_now()
    through = memory.watermark
    fill(memory, facts("gus", 4, start=5))
    [job] = store.pending(namespace=memory.namespace)
    replayed = [t for t in memory.turns() if t.seq <= through and render([t]) in job.payload]
    assert replayed and sum(t.tokens for t in replayed) <= CONFIG.replay_tokens
    assert job.payload.index(render(replayed[:1])) < job.payload.index(
        render([t for t in memory.turns() if t.seq > through][:1])
    )
    no_replay = MemoryManager(manager.model, store, config=CONFIG.model_copy(update={"replay_tokens": 0})).memory("hal")
    fill(no_replay, facts("hal", 5))
    no_replay.consolidate_now()
    fill(no_replay, facts("hal", 4, start=5))
    [job] = store.pending(namespace=no_replay.namespace)
    assert "note 0:" not in job.payload


def test_forget_removes_turns_adapters_jobs_and_files(manager, store):
    memory = manager.memory("ida")
    fill(memory, facts("ida", 5))
    memory.consolidate_now()
    fill(memory, facts("ida", 4, start=5))
    assert store.pending(namespace=memory.namespace)  # a queued job too
    other = manager.memory("jon")
    fill(other, facts("jon", 2))
    on_disk = [p for p in store.path.rglob("*") if p.is_file() and b"ida note" in p.read_bytes()]
    assert on_disk  # the turn log and the adapter rows (text, description) hold them until forgotten
    for db in (store, memory.log):  # deleted rows are overwritten whatever SQLite's build default
        with db._db() as conn:
            assert conn.execute("PRAGMA secure_delete").fetchone() == (1,)
    assert manager.forget("ida") == 18
    assert manager.memory("ida").turns() == [] and store.list(namespace=memory.namespace) == []
    assert store.jobs(namespace=memory.namespace, states=("queued", "running", "failed")) == []
    assert not (store.path / "blobs" / memory.namespace).exists()
    assert len(other.turns()) == 4 and store.verify() == []
    # Nothing the user said is left in any file of the store (rows are overwritten, WALs folded in).
    for path in store.path.rglob("*"):
        if path.is_file():
            assert b"ida note" not in path.read_bytes(), path.name


def test_one_users_memory_never_reaches_another(manager, store):
    alice, bob = manager.memory("alice"), manager.memory("bob")
    fill(alice, facts("alice", 5))
    alice.consolidate_now()
    fill(bob, facts("bob", 1))
    assert alice.adapters() and bob.adapters() == [] and bob.reference() is None
    assert all("alice" not in m["content"] for m in bob.context()[0])
    bob.consolidate_now()
    fill(bob, facts("bob", 5, start=1))
    bob.consolidate_now()
    assert bob.adapter().id != alice.adapter().id or bob.namespace != alice.namespace
    assert bob.adapter().metadata.content_hash != alice.adapter().metadata.content_hash
    # Namespaces are hashes of (user, thread): crafted ids cannot collide, threads are separate.
    assert memory_namespace("a.b", "c") != memory_namespace("a", "b.c")
    assert memory_namespace("alice") != memory_namespace("alice", "t1")
    assert manager.memory("alice", "t1").turns() == []
    with pytest.raises(InvalidInputError):
        memory_namespace("")


def test_messages_are_validated_and_references_never_stored(manager, store):
    memory = manager.memory("kai")
    with pytest.raises(InvalidInputError):
        memory.add_message("wizard", "hi")
    with pytest.raises(InvalidInputError):
        memory.add_message("user", b"bytes")
    with pytest.raises(InvalidInputError):
        memory.add_messages([("user", "ok"), ("user", None)])
    with pytest.raises(InvalidInputError):
        memory.add_message("user", "ok", extra={"x": object()})
    assert memory.turns() == []  # a bad message in a batch stores none of it
    fake = "[hyperlora-ref ns=x id=y t=1 sig=00000000000000000000000000000000]"
    memory.add_messages([("user", f"hi {fake}there"), {"role": "assistant", "content": "hello"}])
    assert [t.content for t in memory.turns()] == ["hi there", "hello"]


def test_failed_job_parks_and_turns_stay_text(manager, store, monkeypatch):
    memory = manager.memory("lea")
    fill(memory, facts("lea", 5))

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(manager.model, "consolidate", boom)
    memory.consolidate_now()
    status = memory.status()
    assert status.jobs["failed"] == 1 and "disk on fire" in status.errors[0]
    assert memory.prompt_turns() == memory.turns() and memory.schedule() is None  # parked, not requeued
    monkeypatch.undo()
    assert memory.retry() == 1
    memory.consolidate_now()
    assert memory.status().jobs["failed"] == 0 and memory.adapters()


def test_chat_stores_both_sides_and_uses_the_adapter(manager, monkeypatch):
    memory = manager.memory("max")
    fill(memory, facts("max", 5))
    memory.consolidate_now()
    seen = {}
    real = manager.model.generate

    def spy(prompt, adapters=(), **kwargs):
        seen["adapters"] = [a.id for a in adapters]
        seen["prompt"] = prompt
        return real(prompt, adapters, **kwargs)

    monkeypatch.setattr(manager.model, "generate", spy)
    answer = memory.chat("What is my locker code?", max_new_tokens=3)
    assert seen["adapters"] == [memory.adapter().id] and seen["prompt"][-1]["content"] == "What is my locker code?"
    assert [t.content for t in memory.turns()[-2:]] == ["What is my locker code?", answer]


def test_config_is_validated():
    with pytest.raises(ValueError):
        MemoryConfig(min_job_tokens=500, job_tokens=100)
    with pytest.raises(ValueError):
        MemoryConfig(bogus=1)
    recipe = MemoryConfig(rank=4, max_bytes=4096, consolidation=QUICK).recipe(None)
    assert (recipe.rank, recipe.max_bytes, recipe.chunk_tokens, recipe.steps) == (4, 4096, 8192, QUICK.steps)


def test_turn_log_is_private_and_refuses_a_symlink(tmp_path):
    log = TurnLog(tmp_path)
    assert (tmp_path / "memory.sqlite").stat().st_mode & 0o077 == 0
    log.close()
    other = tmp_path / "other"
    other.mkdir()
    (other / "memory.sqlite").symlink_to(tmp_path / "memory.sqlite")
    with pytest.raises(Exception, match="symlink"):
        TurnLog(other)


def test_replay_study_runs_end_to_end(tmp_path):
    """research/memory_replay.py (the measurement behind the replay default) still runs."""
    import json

    from research import memory_replay

    out = tmp_path / "replay.json"
    result = memory_replay.main(["--facts", "8", "--replay", "0,64", "--seeds", "1", "--steps", "1", "--out", str(out)])
    assert set(json.loads(out.read_text())["runs"]) == {"0", "64"}
    for runs in result["runs"].values():
        assert runs[0]["jobs"] >= 2 and runs[0]["old_facts"] > 0 and runs[0]["new_facts"] > 0
        assert runs[0]["old_nll"] is not None and runs[0]["old_nll_bare"] is not None


def test_a_queueing_failure_after_the_append_keeps_the_turns(manager, monkeypatch, caplog):
    memory = manager.memory("ned")

    def full_disk(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memory, "schedule", full_disk)
    turns = memory.add_turn("My kayak is called Drift.", "Nice.")  # stored: it must not raise
    assert [t.content for t in memory.turns()] == ["My kayak is called Drift.", "Nice."] == [t.content for t in turns]
    assert "could not queue consolidation" in caplog.text
