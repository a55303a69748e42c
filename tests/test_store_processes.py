"""The store across real processes: SIGKILL at random points, concurrent writers, the file lock,
readers during writes, and the persistent job queue surviving a killed worker.

Children are forked from a small fork server (a subprocess that imported torch and built the tiny
model once), so each of the many kills costs milliseconds instead of a Python start-up. Children
are real processes killed with SIGKILL: no ``finally``, no atexit, no flush, like ``kill -9``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.adapters.corpus import document_id
from hyperlora_integrations.errors import AdapterNotFoundError
from hyperlora_integrations.lora import Adapter, AdapterMetadata, content_hash

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

ROOT = Path(__file__).resolve().parent.parent
KILLS = 84  # random SIGKILLs during store writes
QUEUE_KILLS = 12  # random SIGKILLs of a background worker with documents queued
CONSOLIDATE_KILLS = 16  # random SIGKILLs of a worker consolidating documents (at most; stops when all are done)

SERVER = r"""
import json, os, random, signal, sys, time, traceback
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch
torch.set_num_threads(1)
from hyperlora_integrations.adapters import AdapterStore, InternalizedCorpus
from hyperlora_integrations.lora import Adapter, AdapterMetadata
from conftest import make_tiny_model
MODEL = make_tiny_model()
torch.set_num_threads(1)

def synthetic(seed, adapter_id):
    g = torch.Generator().manual_seed(seed)
    return Adapter({"down_proj": torch.randn(2, 4, 128, generator=g)}, {"down_proj": torch.randn(2, 64, 4, generator=g)},
                   metadata=AdapterMetadata(id=adapter_id, kind="document", content_hash=f"hash{seed}", seed=seed))

def put_loop(path, seed):
    # puts, replaces, removes and metadata updates forever, until killed
    store = AdapterStore(path)
    rng = random.Random(seed)
    i = 0
    while True:
        i += 1
        ids = [m.id for m in store.list()]
        op = rng.random()
        if op < 0.55 or not ids:
            store.put(synthetic(seed * 100000 + i, f"p{seed}-{i}"), text=f"text {i}")
        elif op < 0.75:
            store.put(synthetic(seed * 100000 + i, rng.choice(ids)))
        elif op < 0.9 or len(ids) > 30:
            store.remove(rng.choice(ids))
        else:
            store.update_metadata(rng.choice(ids), touched=i)
            store.enqueue("document", f"j{seed}-{i}", "queued text")

def writer(path, proc, n):
    store = AdapterStore(path)
    for i in range(n):
        store.put(synthetic(proc * 1000 + i, f"w{proc}-{i}"))
        store.update_metadata("shared", **{f"p{proc}_{i}": i})
        if i % 4 == 0:
            store.enqueue("document", f"job{proc}-{i}", f"text {proc} {i}")
    return {"done": n}

def hold_lock(path, seconds, marker):
    store = AdapterStore(path)
    with store.write_lock():
        open(marker, "w").close()
        time.sleep(seconds)
    return {}

def queue_worker(path, docs):
    store = AdapterStore(path)
    corpus = InternalizedCorpus(MODEL, store, namespace="q")
    ids = corpus.add_texts(docs, background=True)   # idempotent: nothing new is queued
    corpus.drain()                                  # competes with the background thread for jobs
    corpus.worker.stop()
    return {"ids": ids, "pending": corpus.pending(), "processed": corpus.worker.processed}

def drain_worker(path, namespace):
    # finishes whatever is queued (consolidations included), competing with nobody
    store = AdapterStore(path)
    corpus = InternalizedCorpus(MODEL, store, namespace=namespace)
    corpus.drain()
    corpus.worker.stop()
    return {"processed": corpus.worker.processed, "left": [j.id for j in store.pending(namespace=namespace)]}

FUNCS = {f.__name__: f for f in (put_loop, writer, hold_lock, queue_worker, drain_worker)}
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            result = FUNCS[cmd["fn"]](**cmd["args"])
            tmp = cmd["result"] + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, cmd["result"])
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(pid, flush=True)
"""


class ForkServer:
    def __init__(self, workdir: Path) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout.readline().strip() == "ready", "fork server failed to start"
        self.workdir = workdir
        self.count = 0

    def spawn(self, fn: str, **args) -> tuple[int, Path]:
        self.count += 1
        result = self.workdir / f"result-{self.count}.json"
        self.proc.stdin.write(json.dumps({"fn": fn, "args": args, "result": str(result)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), result

    @staticmethod
    def kill(pid: int, result: Path) -> bool:
        """SIGKILL our child (unless it already finished); wait until it is gone."""
        if result.exists():
            return False
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.002)
        raise AssertionError(f"child {pid} survived SIGKILL")

    @staticmethod
    def wait(result: Path, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not result.exists():
            assert time.monotonic() < deadline, f"child did not finish ({result.name})"
            time.sleep(0.01)
        return json.loads(result.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield s
    s.close()


def synthetic(seed: int, adapter_id: str) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {"down_proj": torch.randn(2, 4, 128, generator=g)},
        {"down_proj": torch.randn(2, 64, 4, generator=g)},
        metadata=AdapterMetadata(id=adapter_id, kind="document", content_hash=f"hash{seed}", seed=seed),
    )


def check_consistent(store: AdapterStore) -> int:
    """Every listed adapter loads and is exactly the one its row describes; no stray files."""
    assert store.verify() == []
    rows = store.list()
    for meta in rows:
        got = store.get(meta.id)
        want = synthetic(meta.seed, meta.id)
        assert torch.equal(got.A["down_proj"], want.A["down_proj"]) and torch.equal(
            got.B["down_proj"], want.B["down_proj"]
        )
    files = list((store.path / "blobs" / "default").glob("*")) if (store.path / "blobs" / "default").exists() else []
    assert len(files) == len(rows), "orphan or temp files survived recovery"
    return len(rows)


def test_sigkill_at_random_points_leaves_a_consistent_store(server, tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "store"
    mid_write = 0
    started = time.monotonic()
    for k in range(KILLS):
        pid, result = server.spawn("put_loop", path=str(path), seed=k + 1)
        time.sleep(rng.uniform(0.01, 0.2))
        assert server.kill(pid, result)
        store = AdapterStore(path)  # reopening runs recovery
        rec = store.recovery
        mid_write += (rec.temp_files + rec.orphan_blobs) > 0
        check_consistent(store)
        store.close()
    elapsed = time.monotonic() - started
    print(f"\n{KILLS} SIGKILLs survived in {elapsed:.1f}s; {mid_write} landed between a blob write and its commit")
    assert mid_write >= 1, "no kill hit the critical window; the test did not exercise it"


def test_concurrent_writers_lose_no_update(server, tmp_path):
    path = tmp_path / "store"
    store = AdapterStore(path)
    store.put(synthetic(0, "shared"))
    procs, n = 4, 20
    children = [server.spawn("writer", path=str(path), proc=p, n=n) for p in range(procs)]
    for _, result in children:
        assert server.wait(result) == {"done": n}
    meta = store.get("shared").metadata
    assert {k: v for k, v in (meta.model_extra or {}).items() if k.startswith("p")} == {
        f"p{p}_{i}": i for p in range(procs) for i in range(n)
    }  # every read-modify-write of the same row survived
    assert {m.id for m in store.list()} == {"shared"} | {f"w{p}-{i}" for p in range(procs) for i in range(n)}
    assert len(store.pending()) == procs * len(range(0, n, 4))
    assert check_consistent(store) == procs * n + 1
    store.close()


def test_file_lock_excludes_other_processes_but_not_readers(server, tmp_path):
    path = tmp_path / "store"
    store = AdapterStore(path)
    store.put(synthetic(1, "a"))
    marker = tmp_path / "locked"
    pid, result = server.spawn("hold_lock", path=str(path), seconds=1.0, marker=str(marker))
    while not marker.exists():
        time.sleep(0.005)
    t0 = time.monotonic()
    assert store.get("a").metadata.seed == 1 and [m.id for m in store.list()] == ["a"]
    assert time.monotonic() - t0 < 0.5  # readers do not wait for the writer
    store.put(synthetic(2, "b"))
    assert time.monotonic() - t0 >= 0.7  # the writer waited for the other process's lock
    server.wait(result)
    store.close()


def test_readers_never_see_a_partial_adapter_while_a_process_writes(server, tmp_path):
    path = tmp_path / "store"
    AdapterStore(path).close()
    pid, result = server.spawn("put_loop", path=str(path), seed=999)
    reads, errors = [0], []
    stop = threading.Event()

    def reader():
        store = AdapterStore(path, cache_bytes=0)  # always from disk
        while not stop.is_set():
            for meta in store.list():
                try:
                    got = store.get(meta.id)
                except AdapterNotFoundError:
                    continue  # removed since it was listed: fine
                except Exception as exc:  # anything else is a torn read
                    errors.append(repr(exc))
                    continue
                want = synthetic(got.metadata.seed, meta.id)
                if not torch.equal(got.B["down_proj"], want.B["down_proj"]):
                    errors.append(f"{meta.id}: weights do not match their metadata")
                reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert server.kill(pid, result)
    assert errors == [] and reads[0] > 20
    store = AdapterStore(path)
    check_consistent(store)
    store.close()


def _queue_docs(n: int) -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [f"Queue document {d}. " + " ".join(words[(i * 7 + d) % 12] + str(i) for i in range(200)) for d in range(n)]


def test_queue_survives_sigkill_nothing_lost_nothing_done_twice(server, tmp_path, tiny_model):
    rng = random.Random(99)
    path = tmp_path / "store"
    docs = _queue_docs(16)
    ids = [document_id("q", d) for d in docs]
    store = AdapterStore(path)
    for d, i in zip(docs, ids):
        assert store.enqueue("document", i, d, namespace="q", fingerprint=tiny_model.fingerprint)
    store.close()
    first_seen: dict[str, tuple[str, str]] = {}  # id -> (blob, created_at) when it first landed
    mid_job = 0
    kills = 0
    for _ in range(QUEUE_KILLS):
        pid, result = server.spawn("queue_worker", path=str(path), docs=docs)
        time.sleep(rng.uniform(0.05, 0.6))
        killed = server.kill(pid, result)
        kills += killed
        store = AdapterStore(path)
        assert store.verify() == []
        with sqlite3.connect(path / "index.sqlite") as db:
            rows = dict(db.execute("SELECT id, blob || ' ' || created_at FROM adapters WHERE namespace = 'q'"))
        jobs = store.jobs(states=("queued", "running", "failed"))
        mid_job += any(j.state == "running" for j in jobs)
        assert not [j for j in jobs if j.state == "failed"]
        assert sorted(set(rows) | {j.id for j in jobs}) == sorted(ids)  # nothing lost
        assert not set(rows) & {j.id for j in jobs}  # nothing both done and queued
        for i, blob in rows.items():  # an adapter, once committed, is never made again
            assert first_seen.setdefault(i, blob) == blob
        store.close()
        if not killed:
            break
    pid, result = server.spawn("queue_worker", path=str(path), docs=docs)
    out = server.wait(result)
    assert out["ids"] == ids and out["pending"] == []
    store = AdapterStore(path)
    with sqlite3.connect(path / "index.sqlite") as db:
        rows = dict(db.execute("SELECT id, blob || ' ' || created_at FROM adapters WHERE namespace = 'q'"))
    assert sorted(rows) == sorted(ids) and store.jobs(states=("queued", "running", "failed")) == []
    for i, blob in first_seen.items():
        assert rows[i] == blob
    assert out["processed"] == len(ids) - len(first_seen)  # the restart did only what was left
    assert store.verify() == []
    print(
        f"\nqueue: {kills} SIGKILLs of a worker, {mid_job} of them mid-job; {len(ids)} documents, each committed once"
    )
    assert mid_job >= 1, "no kill interrupted a running job; the test did not exercise reclaiming"
    store.close()


def _consolidation_rows(path: Path) -> dict[str, tuple[str, bool]]:
    """id -> ("<blob> <created_at>", consolidated?) of namespace "c", read straight from the index."""
    with sqlite3.connect(path / "index.sqlite") as db:
        rows = db.execute("SELECT id, blob || ' ' || created_at, metadata FROM adapters WHERE namespace = 'c'")
        return {i: (blob, bool(json.loads(meta).get("consolidated"))) for i, blob, meta in rows}


def test_consolidation_queue_survives_sigkill_nothing_lost_nothing_done_twice(server, tmp_path, tiny_model):
    """Workers consolidating documents (gradient steps, then ``complete`` replacing the instant
    adapter in the same transaction that deletes the job) are SIGKILLed at random points.

    After every kill: the store verifies; every document is stored or queued; a document that had
    an instant adapter still has one (the replace never leaves a gap); a consolidated adapter, once
    committed, never changes and is never queued again. The final run does exactly what is left.
    """
    rng = random.Random(7)
    path = tmp_path / "store"
    docs = _queue_docs(8)
    ids = [document_id("c", d) for d in docs]
    store = AdapterStore(path)
    instant = set()
    for k, (d, i) in enumerate(zip(docs, ids)):
        if k % 2 == 0:  # half start with an instant (hypernetwork) adapter that consolidation replaces
            adapter = tiny_model.internalize(d, progress=False)
            adapter.metadata.id = i
            store.put(adapter, namespace="c", text=d)
            instant.add(i)
        assert store.enqueue(
            "consolidate", i, d, namespace="c", content_hash=content_hash(d), fingerprint=tiny_model.fingerprint
        )
    assert store.verify() == []
    store.close()
    first_done: dict[str, str] = {}
    kills = mid_job = 0
    for _ in range(CONSOLIDATE_KILLS):
        pid, result = server.spawn("drain_worker", path=str(path), namespace="c")
        time.sleep(rng.uniform(0.05, 0.6))
        killed = server.kill(pid, result)
        kills += killed
        store = AdapterStore(path)
        assert store.verify() == []
        rows = _consolidation_rows(path)
        jobs = {j.id: j for j in store.jobs(namespace="c", states=("queued", "running", "failed"))}
        mid_job += any(j.state == "running" for j in jobs.values())
        assert not [j for j in jobs.values() if j.state == "failed"]
        assert sorted(set(rows) | set(jobs)) == sorted(ids)  # nothing lost
        assert instant <= set(rows)  # an instant adapter is replaced, never removed first
        for i, (blob, consolidated) in rows.items():
            if consolidated:
                assert i not in jobs  # consolidated once, never queued again
                assert first_done.setdefault(i, blob) == blob  # and never redone
            else:
                assert i in jobs  # an instant adapter is stored only while its consolidation waits
        store.close()
        if not killed:
            break
    pid, result = server.spawn("drain_worker", path=str(path), namespace="c")
    out = server.wait(result, timeout=600)
    assert out["left"] == [] and out["processed"] == len(ids) - len(first_done)
    rows = _consolidation_rows(path)
    assert sorted(rows) == sorted(ids) and all(consolidated for _, consolidated in rows.values())
    for i, blob in first_done.items():
        assert rows[i][0] == blob
    store = AdapterStore(path)
    assert store.verify() == [] and store.jobs(states=("queued", "running", "failed")) == []
    files = list((store.path / "blobs" / "c").iterdir())
    assert len(files) == len(ids), "a replaced instant adapter's blob was left behind"
    store.close()
    print(f"\nconsolidation: {kills} SIGKILLs of a worker, {mid_job} of them mid-job; {len(ids)} documents")
    assert mid_job >= 1, "no kill interrupted a running consolidation"
