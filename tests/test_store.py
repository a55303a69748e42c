"""AdapterStore in one process: namespaces, dedupe, the LRU budget, crash recovery, unsafe paths,
the write lock and the job queue's state machine. Multi-process behaviour (kill -9, concurrent
writers) is in ``test_store_processes.py``."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time

import pytest
import torch

from hyperlora_integrations.adapters import AdapterStore, InternalizedCorpus, store_signer
from hyperlora_integrations.adapters.references import load_or_create_secret
from hyperlora_integrations.errors import (
    AdapterNotFoundError,
    CheckpointError,
    HyperLoRAError,
    InvalidInputError,
    UnsafeFileError,
)
from hyperlora_integrations.lora import Adapter, AdapterMetadata


def synthetic(seed: int, *, adapter_id: str | None = None, rank: int = 4, layers: int = 2) -> Adapter:
    """A deterministic adapter shaped for the tiny model's down_proj (128 -> 64)."""
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {"down_proj": torch.randn(layers, rank, 128, generator=g)},
        {"down_proj": torch.randn(layers, 64, rank, generator=g)},
        metadata=AdapterMetadata(id=adapter_id or f"a{seed}", kind="document", content_hash=f"hash{seed}", seed=seed),
    )


def same(a: Adapter, b: Adapter) -> bool:
    return a.A.keys() == b.A.keys() and all(torch.equal(a.A[k], b.A[k]) and torch.equal(a.B[k], b.B[k]) for k in a.A)


def test_roundtrip_and_index_queries(store):
    a = synthetic(1)
    assert store.put(a, namespace="n", text="source text") == "a1"
    got = store.get("a1", namespace="n")
    assert same(got, a) and got.metadata.seed == 1
    assert store.contains("a1", namespace="n") and not store.contains("a1")
    assert store.text("a1", namespace="n") == "source text"
    assert store.metadata("a1", namespace="n").content_hash == "hash1"
    assert store.find_by_hash("hash1", namespace="n") == "a1"
    assert [m.id for m in store.list(namespace="n")] == ["a1"]
    assert len(store) == 1 and store.verify() == []
    store.remove("a1", namespace="n")
    with pytest.raises(AdapterNotFoundError):
        store.get("a1", namespace="n")
    with pytest.raises(AdapterNotFoundError):
        store.remove("a1", namespace="n")
    assert list((store.path / "blobs" / "n").iterdir()) == []


def test_namespaces_are_separate(store):
    store.put(synthetic(1, adapter_id="x"), namespace="tenant-a")
    store.put(synthetic(2, adapter_id="x"), namespace="tenant-b")
    assert store.get("x", namespace="tenant-a").metadata.seed == 1
    assert store.get("x", namespace="tenant-b").metadata.seed == 2
    assert store.find_by_hash("hash1", namespace="tenant-b") is None
    store.remove("x", namespace="tenant-a")
    assert store.get("x", namespace="tenant-b").metadata.seed == 2
    assert store.namespaces() == ["tenant-b"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".", "..", "x" * 129, "a b", "ü", "a\x00b", None, 3])
def test_names_that_could_escape_are_refused(store, bad):
    with pytest.raises(InvalidInputError):
        store.put(synthetic(1), namespace=bad)
    a = synthetic(1)
    a.metadata.id = bad
    with pytest.raises(InvalidInputError):
        store.put(a)
    with pytest.raises(InvalidInputError):
        store.get("a1", namespace=bad)
    with pytest.raises(InvalidInputError):
        store.enqueue("document", bad, "text")
    assert list(store.path.rglob("*.safetensors")) == []


def test_dedupe_by_content_hash_per_namespace(tiny_model, tmp_path, monkeypatch):
    calls = []
    original = tiny_model.internalize
    monkeypatch.setattr(tiny_model, "internalize", lambda text, **kw: calls.append(text) or original(text, **kw))
    store = AdapterStore(tmp_path / "s")
    one = InternalizedCorpus(tiny_model, store, namespace="one")
    ids = one.add_texts(["Alpha doc.", "Beta doc.", "Alpha doc."])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert one.add_texts(["Beta doc."]) == [ids[1]]
    assert calls == ["Alpha doc.", "Beta doc."]
    other = InternalizedCorpus(tiny_model, store, namespace="two")
    other_ids = other.add_texts(["Alpha doc."])
    assert other_ids[0] != ids[0] and len(calls) == 3  # namespaces never share adapters
    # reopening the store (another process, a restart) still dedupes
    again = InternalizedCorpus(tiny_model, AdapterStore(tmp_path / "s"), namespace="one")
    assert again.add_texts(["Alpha doc."]) == [ids[0]] and len(calls) == 3
    store.close()


def test_lru_budget_evicts_and_reloads_transparently(tmp_path):
    one = synthetic(0).nbytes
    store = AdapterStore(tmp_path / "s", cache_bytes=int(2.5 * one))
    originals = [synthetic(i) for i in range(6)]
    for a in originals:
        store.put(a)
        assert store.cached_bytes <= store.cache_bytes
    assert store.cached() == [("default", "a4"), ("default", "a5")]
    for a in originals:  # every evicted adapter comes back from disk, bit for bit
        got = store.get(a.id)
        assert same(got, a)
        assert store.cached_bytes <= store.cache_bytes
    assert store.cached()[-1] == ("default", "a5")
    store.get("a0")
    assert store.cached()[-1] == ("default", "a0")  # most recently used is last to go
    big = AdapterStore(tmp_path / "s", cache_bytes=one - 1)  # nothing fits: still served
    assert same(big.get("a3"), originals[3]) and big.cached_bytes == 0
    store.close()
    big.close()


def test_cache_never_serves_what_another_process_replaced_or_removed(tmp_path):
    a = AdapterStore(tmp_path / "s")
    b = AdapterStore(tmp_path / "s")
    a.put(synthetic(1, adapter_id="x"))
    assert a.get("x").metadata.seed == 1
    b.put(synthetic(2, adapter_id="x"))
    assert same(a.get("x"), synthetic(2, adapter_id="x"))
    b.remove("x")
    with pytest.raises(AdapterNotFoundError):
        a.get("x")
    a.close()
    b.close()


def test_symlinked_blob_is_refused_and_outside_file_untouched(store, tmp_path):
    store.put(synthetic(1))
    blob = next((store.path / "blobs" / "default").iterdir())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(synthetic(2, adapter_id="a1").to_bytes())  # a perfectly valid adapter
    blob.unlink()
    blob.symlink_to(outside)
    store._cache.clear()
    with pytest.raises(UnsafeFileError):
        store.get("a1")
    assert any("UnsafeFileError" in p for p in store.verify())
    AdapterStore(store.path).close()  # recovery does not follow or delete it
    store.remove("a1")
    assert outside.exists()


def test_symlinked_namespace_directory_is_refused(store, tmp_path):
    store.put(synthetic(1), namespace="ns")
    ns_dir = store.path / "blobs" / "ns"
    elsewhere = tmp_path / "elsewhere"
    ns_dir.rename(elsewhere)
    ns_dir.symlink_to(elsewhere, target_is_directory=True)
    store._cache.clear()
    with pytest.raises(UnsafeFileError):
        store.get("a1", namespace="ns")
    with pytest.raises(UnsafeFileError):
        store.put(synthetic(2), namespace="ns")
    AdapterStore(store.path).close()
    assert len(list(elsewhere.iterdir())) == 1  # recovery never deletes through the link


def test_tampered_index_cannot_point_outside(store, tmp_path):
    store.put(synthetic(1))
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(synthetic(1).to_bytes())
    with sqlite3.connect(store.path / "index.sqlite") as db:
        db.execute("UPDATE adapters SET blob = ?", ("../../../victim.safetensors",))
    store._cache.clear()
    with pytest.raises(UnsafeFileError):
        store.get("a1")
    store.remove("a1")
    assert victim.exists()


@pytest.mark.parametrize(
    "content",
    [b"\x80\x04\x95\x00\x00", b"PK\x03\x04rest-of-zip", b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", b"garbage" * 10],
)
def test_corrupt_or_pickled_blob_gives_typed_error(store, content):
    store.put(synthetic(1))
    blob = next((store.path / "blobs" / "default").iterdir())
    blob.write_bytes(content)
    store._cache.clear()
    with pytest.raises(CheckpointError):  # UnsafeFileError is a CheckpointError
        store.get("a1")
    assert store.verify() != []


def test_recovery_removes_temp_files_and_orphans_only(store):
    store.put(synthetic(1))
    d = store.path / "blobs" / "default"
    (d / ".tmp-killed-mid-write").write_bytes(b"half")
    (d / "a9.0123456789abcdef.safetensors").write_bytes(synthetic(9).to_bytes())
    (store.path / ".secret-killed").write_bytes(b"x")
    reopened = AdapterStore(store.path)
    assert reopened.recovery.temp_files == 2 and reopened.recovery.orphan_blobs == 1
    with sqlite3.connect(store.path / "index.sqlite") as db:
        (blob,) = db.execute("SELECT blob FROM adapters").fetchone()
    assert [p.name for p in d.iterdir()] == [blob]
    assert same(reopened.get("a1"), synthetic(1)) and reopened.verify() == []
    reopened.close()


def test_store_written_before_nonce_blobs_still_opens(tmp_path):
    root = tmp_path / "old"
    (root / "blobs" / "default").mkdir(parents=True)
    a = synthetic(5)
    (root / "blobs" / "default" / "a5.safetensors").write_bytes(a.to_bytes())
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute(
            "CREATE TABLE adapters (namespace TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, content_hash TEXT "
            "NOT NULL DEFAULT '', created_at TEXT NOT NULL, nbytes INTEGER NOT NULL, metadata TEXT NOT NULL, text TEXT, "
            "PRIMARY KEY (namespace, id))"
        )
        m = a.metadata
        db.execute(
            "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?)",
            ("default", "a5", m.kind, m.content_hash, m.created_at, a.nbytes, m.model_dump_json(), None),
        )
    store = AdapterStore(root)
    assert store.recovery.orphan_blobs == 0 and same(store.get("a5"), a) and store.verify() == []
    store.put(synthetic(6, adapter_id="a5"))
    assert not (root / "blobs" / "default" / "a5.safetensors").exists()
    assert same(store.get("a5"), synthetic(6))
    store.close()


def test_update_metadata_merges_and_protects_identity(store):
    store.put(synthetic(1))
    store.update_metadata("a1", tags=["x"])
    meta = store.update_metadata("a1", owner="bob")
    assert meta.tags == ["x"] and meta.owner == "bob"
    assert store.get("a1").metadata.owner == "bob"
    with pytest.raises(InvalidInputError):
        store.update_metadata("a1", content_hash="forged")
    with pytest.raises(InvalidInputError):
        store.update_metadata("a1", blob=object())
    with pytest.raises(AdapterNotFoundError):
        store.update_metadata("nope", owner="x")


def test_secret_is_private_unique_and_not_a_symlink(tmp_path):
    root = tmp_path / "s"
    stores = [AdapterStore(root) for _ in range(4)]
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda s=s: keys.append(store_signer(s)._key)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE(os.stat(root / "secret").st_mode) == 0o600
    (root / "secret").unlink()
    (tmp_path / "attacker-key").write_bytes(b"k" * 32)
    (root / "secret").symlink_to(tmp_path / "attacker-key")
    with pytest.raises(UnsafeFileError):
        load_or_create_secret(root / "secret")
    (root / "secret").unlink()
    (root / "secret").write_bytes(b"short")
    with pytest.raises(CheckpointError):
        store_signer(stores[0])
    for s in stores:
        s.close()


def test_write_lock_serialises_threads_and_is_reentrant(store):
    started = threading.Event()
    done = []

    def writer():
        started.set()
        store.put(synthetic(2))
        done.append(time.monotonic())

    with store.write_lock(), store.write_lock():  # reentrant
        t = threading.Thread(target=writer)
        t.start()
        started.wait()
        time.sleep(0.3)
        assert not done  # blocked behind us
        released = time.monotonic()
    t.join()
    assert done and done[0] >= released
    assert store.get("a2").metadata.seed == 2


# ---------------------------------------------------------------------- the job queue
def test_queue_order_claims_completion_and_dedupe(store):
    assert store.enqueue("skill", "s1", "describe", namespace="n")
    assert store.enqueue("document", "d1", "first", namespace="n")
    assert store.enqueue("document", "d2", "second", namespace="n")
    assert not store.enqueue("document", "d1", "first", namespace="n")  # already queued
    assert [j.id for j in store.pending(namespace="n")] == ["s1", "d1", "d2"]
    assert store.pending_text("d1", namespace="n") == "first"
    assert store.pending_text("s1", namespace="n") is None  # skills are not documents
    assert store.text("d2", namespace="n") == "second"
    owner = store.register_worker()
    order = []
    while (job := store.claim(owner)) is not None:
        order.append(job.id)
        a = synthetic(len(order), adapter_id=job.id)
        assert store.complete(job, a, text=job.payload)
    assert order == ["d1", "d2", "s1"]  # documents oldest first, skills when no document waits
    assert store.pending() == [] and store.verify() == []
    assert not store.enqueue("document", "d1", "first", namespace="n")  # already stored
    assert store.pending_text("d1", namespace="n") is None


def test_cancelled_or_superseded_job_is_never_committed(store):
    owner = store.register_worker()
    store.enqueue("document", "d1", "text")
    job = store.claim(owner)
    store.remove("d1")  # cancelled while running
    assert not store.complete(job, synthetic(1, adapter_id="d1"))
    with pytest.raises(AdapterNotFoundError):
        store.get("d1")
    store.enqueue("document", "d2", "text")
    job = store.claim(owner)
    store.put(synthetic(7, adapter_id="d2"))  # done in the foreground meanwhile
    assert not store.complete(job, synthetic(8, adapter_id="d2"))
    assert store.get("d2").metadata.seed == 7
    assert store.verify() == [] and len(list((store.path / "blobs" / "default").iterdir())) == 1


def test_dead_workers_jobs_are_reclaimed_live_ones_are_not(store):
    store.enqueue("document", "d1", "text")
    live = store.register_worker()
    assert store.claim(live).id == "d1"
    other = AdapterStore(store.path)  # another process's view
    assert other.claim(other.register_worker()) is None  # d1's owner is alive
    # a worker that died: its lock file is gone/unlocked, so its claim lapses
    with sqlite3.connect(store.path / "index.sqlite") as db:
        db.execute("UPDATE jobs SET owner = 'deadbeefdeadbeef'")
    job = other.claim(other.register_worker())
    assert job is not None and job.id == "d1" and job.attempts == 2
    other.close()


def test_failed_jobs_park_and_retry(store):
    owner = store.register_worker()
    store.enqueue("document", "d1", "text", namespace="n")
    job = store.claim(owner)
    store.fail(job, "DocumentTooLargeError: too big")
    assert store.pending() == [] and store.claim(owner) is None
    assert [j.error for j in store.failed()] == ["DocumentTooLargeError: too big"]
    assert store.pending_text("d1", namespace="n") == "text"  # still answerable by context
    assert store.retry_failed(namespace="n") == 1
    assert store.claim(owner).id == "d1"


def test_jobs_of_another_base_model_are_left_alone(store):
    store.enqueue("document", "d1", "text", fingerprint="llama:L30:H576")
    owner = store.register_worker()
    assert store.claim(owner, fingerprint="llama:L2:H64") is None
    assert store.claim(owner, fingerprint="llama:L30:H576").id == "d1"


def test_enqueue_validates(store):
    with pytest.raises(InvalidInputError):
        store.enqueue("recipe", "x", "t")
    with pytest.raises(InvalidInputError):
        store.enqueue("document", "x", b"bytes")
    with pytest.raises(InvalidInputError):
        store.enqueue("document", "x", "bad \udcff surrogate")
    with pytest.raises(InvalidInputError):
        store.enqueue("document", "x", "t", options={"f": object()})
    with pytest.raises(HyperLoRAError):
        AdapterStore(store.path, cache_bytes=-1)


def test_index_is_valid_json_and_sql_injection_is_inert(store):
    evil = "x'); DROP TABLE adapters; --"
    store.enqueue("document", "d1", evil, options={"source": evil})
    store.put(synthetic(1), text=evil)
    assert store.text("a1") == evil and store.pending_text("d1") == evil
    with sqlite3.connect(store.path / "index.sqlite") as db:
        for (meta,) in db.execute("SELECT metadata FROM adapters"):
            json.loads(meta)
    assert store.verify() == []
