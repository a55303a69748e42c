"""Regression tests of issue #19 (hostile-input review) for the store: fork, ``.tmp-`` ids,
names with a trailing newline, metadata validation, file permissions and a full disk.

Each failed before the fix (a frozen writer, a lost blob, an untyped exception, a world-readable
index); docs/reliability.md lists them with the guarantee each backs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.adapters.store import StoreWriteError, check_name, store_signer
from hyperlora_integrations.errors import HyperLoRAError, InvalidInputError
from hyperlora_integrations.lora import Adapter, AdapterMetadata


def small_adapter(adapter_id: str, seed: int = 0, d: int = 8) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {"m": torch.randn(2, 2, d, generator=g)},
        {"m": torch.randn(2, d, 2, generator=g)},
        metadata=AdapterMetadata(id=adapter_id, kind="document"),
    )


# ---------------------------------------------------------------------- 1. fork while the lock is held
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_a_thread_holds_the_write_lock_freezes_no_writer(store):
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.write_lock():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child only sleeps, as a multiprocessing worker would before its own work
        try:
            time.sleep(600)  # killed by the parent below
        finally:
            os._exit(0)
    try:
        release.set()
        thread.join(10)
        done = threading.Event()
        writer = threading.Thread(target=lambda: (store.put(small_adapter("after-fork")), done.set()), daemon=True)
        writer.start()
        assert done.wait(20), "the parent's put waited for the forked child to exit"
        # a separate process opening the store (it takes the write lock for recovery); only the open
        # is timed, not the imports (minutes on a loaded machine)
        code = (
            "import time; from hyperlora_integrations.adapters import AdapterStore; t = time.monotonic(); "
            f"AdapterStore({str(store.path)!r}); print(time.monotonic() - t)"
        )
        out = subprocess.run([sys.executable, "-c", code], timeout=600, check=True, capture_output=True, text=True)
        assert float(out.stdout.strip().splitlines()[-1]) < 20, "another process's open waited for the child"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert store.get("after-fork").id == "after-fork" and store.verify() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_can_use_the_store_itself(store):
    store.put(small_adapter("a"))
    with store.write_lock():
        pid = os.fork()
        if pid == 0:
            code = 1
            try:  # waits for the parent to release, then writes (it used to wait for itself forever)
                store.put(small_adapter("from-child", seed=1))
                code = 0
            finally:
                os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child deadlocked on the lock descriptor it inherited")
    assert os.WEXITSTATUS(status) == 0
    assert {m.id for m in store.list()} == {"a", "from-child"}


# ---------------------------------------------------------------------- 2. ids that look like temp files
@pytest.mark.parametrize("adapter_id", [".tmp-mydoc", ".tmp-", ".tmp-abc.0123456789abcdef"])
def test_adapter_whose_id_starts_with_tmp_survives_reopening(tmp_path, adapter_id):
    with AdapterStore(tmp_path / "s") as store:
        store.put(small_adapter(adapter_id))
    with AdapterStore(tmp_path / "s") as store:
        assert store.recovery.temp_files == 0 and store.recovery.orphan_blobs == 0
        assert store.get(adapter_id).id == adapter_id and store.verify() == []


def test_real_temp_files_are_still_removed(tmp_path):
    with AdapterStore(tmp_path / "s") as store:
        store.put(small_adapter(".tmp-keep"))
        (store.path / "blobs" / "default" / ".tmp-abcd1234").write_bytes(b"half a blob")
    with AdapterStore(tmp_path / "s") as store:
        assert store.recovery.temp_files == 1 and store.get(".tmp-keep").id == ".tmp-keep"


# ---------------------------------------------------------------------- 7. trailing newline in names
@pytest.mark.parametrize("name", ["tenant\n", "..\n", ".\n", "a\n", "a\r", "\na"])
def test_names_with_a_trailing_newline_are_refused(store, name):
    with pytest.raises(InvalidInputError):
        check_name(name, "namespace")
    with pytest.raises(InvalidInputError):
        store.put(small_adapter("x"), namespace=name)
    with pytest.raises(InvalidInputError):
        store.put(small_adapter(name))
    with pytest.raises(InvalidInputError):
        store.enqueue("document", "x", "text", namespace=name)
    assert store.namespaces() == []


# ---------------------------------------------------------------------- 6. metadata validation
@pytest.mark.parametrize("fields", [{"source": 123}, {"description": None}, {"source": ["a"]}])
def test_update_metadata_with_wrong_types_is_a_typed_error(store, fields):
    store.put(small_adapter("a"))
    with pytest.raises(InvalidInputError):
        store.update_metadata("a", **fields)
    assert store.metadata("a").source == "" and store.verify() == []


# ---------------------------------------------------------------------- 10. permissions
def test_store_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with AdapterStore(tmp_path / "s") as store:
            store.put(small_adapter("a"), namespace="tenant", text="private source text")
            store_signer(store)  # creates the reference key
            modes = {
                p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
                for p in [tmp_path / "s", *(tmp_path / "s").rglob("*")]
            }
    finally:
        os.umask(old)
    assert {"s/index.sqlite", "s/index.sqlite-wal", "s/index.sqlite-shm", "s/blobs/tenant"} <= set(modes)
    loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert loose == {}, loose


def test_existing_world_readable_index_is_tightened(tmp_path):
    with AdapterStore(tmp_path / "s") as store:
        store.put(small_adapter("a"), text="private")
    os.chmod(tmp_path / "s" / "index.sqlite", 0o644)
    with AdapterStore(tmp_path / "s") as store:
        assert stat.S_IMODE((store.path / "index.sqlite").stat().st_mode) == 0o600
        assert store.text("a") == "private"


# ---------------------------------------------------------------------- 6. disk full
DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from hyperlora_integrations.adapters import AdapterStore
    from hyperlora_integrations.adapters.store import StoreWriteError
    from hyperlora_integrations.errors import HyperLoRAError
    from hyperlora_integrations.lora import Adapter, AdapterMetadata

    def adapter(i):
        g = torch.Generator().manual_seed(i)
        return Adapter({"m": torch.randn(2, 4, 1024, generator=g)}, {"m": torch.randn(2, 1024, 4, generator=g)},
                       metadata=AdapterMetadata(id=f"a{i}", kind="document"))

    out = {}
    store = AdapterStore(sys.argv[1])
    stored, error = [], None
    for i in range(1000):
        try:
            store.put(adapter(i), text="source text " * 200)
            stored.append(f"a{i}")
        except Exception as exc:
            error = exc
            break
    out["stored"] = len(stored)
    out["error"] = type(error).__name__
    out["typed"] = isinstance(error, HyperLoRAError)
    out["verify_full"] = store.verify()
    out["listed_full"] = sorted(m.id for m in store.list()) == sorted(stored)
    for job in range(50):  # enqueue and update_metadata on a full disk: typed too
        try:
            store.enqueue("document", f"job{job}", "x" * 50_000)
        except Exception as exc:
            out["enqueue_error"] = type(exc).__name__
            break
    try:
        for adapter_id in stored[:20]:
            store.remove(adapter_id)
        out["removed"] = True
    except Exception as exc:
        out["removed"] = type(exc).__name__
    store.put(adapter(10_000))  # space freed through the store is usable again
    store.close()
    reopened = AdapterStore(sys.argv[1])
    out["verify_after"] = reopened.verify()
    out["count_after"] = len(reopened)
    print(json.dumps(out))
    """
)


def _small_filesystem_runner() -> list[str] | None:
    """A command prefix that runs a command with a 6 MiB tmpfs mounted at $SMALLFS (a private mount
    namespace), or None where that is not possible (no ``unshare``, no user namespaces)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return None
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && echo ok"],
        capture_output=True,
        text=True,
    )
    return ["unshare", "-rm"] if probe.stdout.strip() == "ok" else None


def test_full_disk_gives_a_typed_error_loses_nothing_and_remove_frees_space(tmp_path):
    runner = _small_filesystem_runner()
    if runner is None:
        pytest.skip("cannot mount a small tmpfs here (needs unshare -rm)")
    mount = tmp_path / "smallfs"
    mount.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_SCRIPT)
    shell = f"mount -t tmpfs -o size=6m tmpfs {mount} && {sys.executable} {script} {mount}/store"
    out = subprocess.run([*runner, "sh", "-c", shell], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stored"] >= 25, result
    assert result["error"] == "StoreWriteError" and result["typed"], result
    assert result["verify_full"] == [] and result["listed_full"], result
    assert result.get("enqueue_error", "StoreWriteError") == "StoreWriteError", result
    assert result["removed"] is True, result
    assert result["verify_after"] == [] and result["count_after"] == result["stored"] - 20 + 1, result


def test_store_write_error_is_a_hyperlora_error_and_an_os_error():
    assert issubclass(StoreWriteError, HyperLoRAError) and issubclass(StoreWriteError, OSError)


def test_failed_commit_leaves_no_transaction_open(store, monkeypatch):
    """A COMMIT that fails (SQLITE_FULL does) used to leave the transaction open, so every later
    write on that connection failed with 'cannot start a transaction within a transaction'."""
    import sqlite3

    store.put(small_adapter("a"))
    with store._db() as db:
        real = db

    class FailingCommit:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    monkeypatch.setattr(store._local, "conn", FailingCommit(real))
    with pytest.raises(StoreWriteError):
        store.put(small_adapter("b"))
    monkeypatch.setattr(store._local, "conn", real)
    assert not real.in_transaction
    store.put(small_adapter("c"))
    assert {m.id for m in store.list()} == {"a", "c"} and store.verify() == []


def test_reserve_file_is_kept(store):
    reserve = Path(store.path) / "reserve"
    assert reserve.stat().st_size >= 2**20
    reserve.unlink()
    store.put(small_adapter("a"))  # the next write takes it back
    assert reserve.stat().st_size >= 2**20
