"""``AdapterStore``: adapters on disk, indexed in SQLite, cached in memory under a byte budget.

Layout of a store directory::

    index.sqlite                               metadata, namespaces, content hashes, source text, job queue
    blobs/<namespace>/<id>.<nonce>.safetensors one adapter each (``Adapter.to_bytes``)
    lock                                       flock'ed by whoever writes (processes and threads)
    reserve                                    1 MiB kept free so ``remove`` works on a full disk
    workers/<token>.lock                       flock'ed by each live background worker
    secret                                     key for signing references (see ``references``)

Why it survives ``kill -9`` at any instant: every write happens under one exclusive file lock and
in this order: the new blob is written to a temp file, fsynced and renamed to a name nobody else
uses (a fresh nonce), then one SQLite transaction switches the index row to it, and only after that
commit is the previous blob unlinked. The commit is the single switch point: killed before it, the
row still names the old, complete blob (the new file is an orphan); killed after it, the row names
the new, complete blob (the old file is an orphan). Orphans and temp files are removed when the
store is next opened, under the same lock, so cleanup can never race a live writer's half-made blob.

Why readers need no lock: SQLite in WAL mode lets any number of readers see the last committed
index while one writer works, and a blob is never modified in place, only replaced under a new name.
A reader that loses a race with a replace or remove retries against the index.

The ``jobs`` table is the persistent queue of background work (documents to internalize, skills to
generate). A job is claimed by a worker that holds a per-worker file lock; if that worker dies, the
kernel drops its lock and the next ``claim`` gives the job to someone else. A job's adapter is
committed in the same transaction that deletes the job, so a job is finished exactly once.

``path=None`` keeps everything in a private temporary directory.

The class is assembled by concern: the index, its transactions and the write lock in
``_index.py``, blob files and the in-memory cache in ``_blobs.py``, the job queue in
``_queue.py``, the signing key in ``_keys.py``. This module sets their state up and holds what
spans them (opening and recovery, ``verify``, ``put``/``remove``/``get``); every public name is
importable from here.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import check_text
from ..errors import AdapterNotFoundError, InvalidInputError, UnsafeFileError
from ..lora import Adapter, AdapterMetadata
from ..lora.adapter import read_safetensors_header
from ._blobs import BlobsMixin, check_name
from ._index import _SCHEMA, _STORES, IndexMixin, StoreWriteError, _is_write_failure, close_all
from ._keys import store_signer
from ._queue import _JOB_COLUMNS, JOB_KINDS, Job, QueueMixin, _job

__all__ = [
    "JOB_KINDS",
    "AdapterStore",
    "Job",
    "RecoveryReport",
    "StoreWriteError",
    "check_name",
    "check_text",
    "store_signer",
]

_READ_RETRIES = 5


@dataclass
class RecoveryReport:
    """What opening the store cleaned up after an earlier crash."""

    temp_files: int = 0
    orphan_blobs: int = 0
    stale_workers: int = 0
    removed: list[str] = field(default_factory=list)


class AdapterStore(IndexMixin, BlobsMixin, QueueMixin):
    """Persistent, namespaced adapter storage shared by retrievers, skills, workers and services.

    Safe to share between threads, and between processes opening the same directory.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, cache_bytes: int = 256 * 2**20) -> None:
        if not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise InvalidInputError(f"cache_bytes must be a non-negative int, got {cache_bytes!r}")
        # ignore_cleanup_errors: a daemon background worker may still be writing at interpreter exit
        self._tmp = (
            tempfile.TemporaryDirectory(prefix="hyperlora-store-", ignore_cleanup_errors=True) if path is None else None
        )
        self.path = Path(self._tmp.name if self._tmp else path)
        # 0700/0600 whatever the umask: the index holds every tenant's source text.
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("blobs", "workers"):
            d = self.path / sub
            if d.is_symlink():
                raise UnsafeFileError(f"{d} is a symlink; refusing to use it as part of the store")
            d.mkdir(exist_ok=True, mode=0o700)
        self._private_index()
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], tuple[str, Adapter]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.RLock()  # cache
        self._wlock = threading.RLock()  # writers within this process
        self._wdepth = 0
        self._wfd: int | None = None
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._worker_fds: dict[str, int] = {}
        self._opening_fd: int | None = None
        self.workers: dict[int, Any] = {}  # background workers bound to this store (see ``worker``)
        _STORES.add(self)
        with self.write_lock():
            with self._db() as db:
                db.executescript(_SCHEMA)
                cols = {r[1] for r in db.execute("PRAGMA table_info(adapters)")}
                if "blob" not in cols:  # stores written before blobs got nonce names
                    db.execute("ALTER TABLE adapters ADD COLUMN blob TEXT")
            self.recovery = self._recover()

    def secret_path(self) -> Path:
        return self.path / "secret"

    def close(self) -> None:
        """Stop this store's background workers and close its SQLite connections."""
        for worker in list(self.workers.values()):
            worker.stop()
        for token in list(self._worker_fds):
            self.unregister_worker(token)
        with self._lock:
            conns, self._conns = self._conns, []
        close_all(conns)
        self._local = threading.local()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ crash recovery
    def _recover(self) -> RecoveryReport:
        """Delete temp files, blobs no index row names, and lock files of dead workers.

        Runs under the write lock, so no live writer can be between writing a blob and
        committing its row (which would make that blob look orphaned).
        """
        report = RecoveryReport()
        with self._db() as db:
            live = {
                (ns, blob or f"{i}.safetensors")
                for ns, i, blob in db.execute("SELECT namespace, id, blob FROM adapters")
            }
        blobs = self.path / "blobs"
        for ns_dir in blobs.iterdir():
            if ns_dir.is_symlink() or not ns_dir.is_dir():
                continue  # not ours to delete; ``get`` refuses to read through it
            for f in ns_dir.iterdir():
                if (ns_dir.name, f.name) in live:  # first: an adapter may be called ".tmp-x" itself
                    continue
                if f.name.startswith(".tmp-"):
                    report.temp_files += 1
                elif f.name.endswith(".safetensors") and not f.is_symlink():
                    report.orphan_blobs += 1
                else:
                    continue
                f.unlink(missing_ok=True)
                report.removed.append(str(f.relative_to(self.path)))
        for f in self.path.glob(".secret-*"):  # a key creation killed before its link
            f.unlink(missing_ok=True)
            report.temp_files += 1
        for f in (self.path / "workers").glob("*.lock"):
            if self._worker_alive(f.stem) is False:
                report.stale_workers += 1
        return report

    def verify(self, *, load: bool = True) -> list[str]:
        """Problems found in the store (empty when consistent): what the crash tests assert.

        Checks that every row's blob exists, is a regular file inside the store and (with
        ``load``) parses as the adapter the row says, and that every job is in a known state.
        """
        problems = []
        with self._db() as db:
            db.execute("BEGIN")  # one snapshot for both tables
            rows = list(db.execute("SELECT namespace, id, blob, content_hash, nbytes FROM adapters"))
            jobs = list(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs"))
            db.execute("COMMIT")
        stored = {(r[0], r[1]) for r in rows}
        for ns, adapter_id, blob, chash, nbytes in rows:
            try:
                path = self._blob_path(ns, blob or f"{adapter_id}.safetensors")
                data = self._read_blob(path)
                if load:
                    adapter = Adapter.from_bytes(data)
                    if adapter.id != adapter_id or adapter.metadata.content_hash != chash or adapter.nbytes != nbytes:
                        problems.append(f"{ns}/{adapter_id}: blob holds {adapter.id} (hash/size disagree)")
                else:
                    read_safetensors_header(data)
            except Exception as exc:  # noqa: BLE001 - verify lists every problem, it never raises on one
                problems.append(f"{ns}/{adapter_id}: {type(exc).__name__}: {exc}")
        for row in jobs:
            try:
                job = _job(row)
            except (TypeError, ValueError) as exc:  # a tampered options column
                problems.append(f"job {row[0]}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if job.state not in ("queued", "running", "failed") or job.kind not in JOB_KINDS:
                problems.append(f"job {job.seq}: bad state/kind {job.state}/{job.kind}")
            # a consolidation job improves the stored (instant) adapter: both may exist at once
            if (job.namespace, job.id) in stored and job.kind != "consolidate":
                problems.append(f"job {job.seq}: {job.namespace}/{job.id} is both queued and stored")
        return problems

    # ------------------------------------------------------------------ writes
    def put(self, adapter: Adapter, *, namespace: str = "default", text: str | None = None) -> str:
        """Store ``adapter`` (atomically) and return its id; ``text`` keeps the source for fallback.

        Replaces an adapter with the same id, and supersedes a queued job for it (its work is done).
        """
        if not isinstance(adapter, Adapter):
            raise InvalidInputError(f"expected an Adapter, got {type(adapter).__name__}")
        check_name(namespace, "namespace")
        check_name(adapter.id, "adapter id")
        if text is not None:
            check_text(text, "text")
        with self.write_lock():
            blob = self._write_blob(namespace, adapter)
            try:
                with self._transaction() as db:
                    old = db.execute(
                        "SELECT blob, id FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter.id)
                    ).fetchone()
                    db.execute(
                        "INSERT OR REPLACE INTO adapters (namespace, id, kind, content_hash, created_at, nbytes, "
                        "metadata, text, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        self._row(namespace, adapter, text, blob),
                    )
                    db.execute("DELETE FROM jobs WHERE namespace = ? AND id = ?", (namespace, adapter.id))
            except BaseException:
                (self._blob_dir(namespace) / blob).unlink(missing_ok=True)
                raise
            if old is not None:
                self._unlink_blob(namespace, old[0] or f"{old[1]}.safetensors")
        self._remember((namespace, adapter.id), blob, adapter)
        return adapter.id

    def remove(self, adapter_id: str, *, namespace: str = "default") -> None:
        """Delete an adapter, or cancel its queued job; ``AdapterNotFoundError`` if neither exists."""
        check_name(namespace, "namespace")
        with self.write_lock():
            try:
                old, jobs = self._delete(namespace, adapter_id)
            except (OSError, sqlite3.OperationalError) as exc:
                # A full disk: give up the reserve and try once more, so space can be freed.
                if not (_is_write_failure(exc) and self._release_reserve()):
                    raise
                old, jobs = self._delete(namespace, adapter_id)
            if old is None and jobs == 0:
                raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
            if old is not None:
                self._unlink_blob(namespace, old[0] or f"{adapter_id}.safetensors")
        self._forget((namespace, adapter_id))

    def _delete(self, namespace: str, adapter_id: str) -> tuple[tuple | None, int]:
        """Delete an adapter's row and job in one transaction: (its old row, jobs deleted)."""
        with self._transaction() as db:
            old = db.execute(
                "SELECT blob FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
            db.execute("DELETE FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id))
            jobs = db.execute("DELETE FROM jobs WHERE namespace = ? AND id = ?", (namespace, adapter_id)).rowcount
        return old, jobs

    def update_metadata(self, adapter_id: str, *, namespace: str = "default", **fields: Any) -> AdapterMetadata:
        """Merge ``fields`` into an adapter's metadata (a read-modify-write under the write lock).

        Identity fields (id, kind, base model, content hash) cannot change: they are what the
        adapter *is*. The index row is authoritative; ``get`` returns the merged metadata.
        """
        frozen = {"id", "kind", "base_model", "base_fingerprint", "content_hash", "created_at"}
        if frozen & set(fields):
            raise InvalidInputError(f"cannot change {sorted(frozen & set(fields))} of a stored adapter")
        try:
            json.dumps(fields)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}") from None
        with self.write_lock(), self._transaction() as db:
            row = db.execute(
                "SELECT metadata FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
            if row is None:
                raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
            meta = json.loads(row[0])
            meta.update(fields)
            try:
                merged = AdapterMetadata.model_validate(meta)
            except ValueError as exc:  # pydantic's ValidationError: source=123, description=None, ...
                raise InvalidInputError(f"invalid metadata for {adapter_id!r}: {exc}") from None
            db.execute(
                "UPDATE adapters SET metadata = ? WHERE namespace = ? AND id = ?",
                (merged.model_dump_json(), namespace, adapter_id),
            )
        return merged

    # ------------------------------------------------------------------ reads
    def get(self, adapter_id: str, *, namespace: str = "default") -> Adapter:
        """The adapter, from the cache or (transparently) from disk. Treat it as read-only."""
        check_name(namespace, "namespace")
        check_name(adapter_id, "adapter id")
        key = (namespace, adapter_id)
        for _ in range(_READ_RETRIES):
            with self._db() as db:
                row = db.execute("SELECT blob, metadata FROM adapters WHERE namespace = ? AND id = ?", key).fetchone()
            if row is None:
                self._forget(key)
                raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
            blob = row[0] or f"{adapter_id}.safetensors"
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None and hit[0] == blob:
                    self._cache.move_to_end(key)
                    if hit[1].metadata.model_dump_json() == row[1]:
                        return hit[1]
            if hit is not None and hit[0] == blob:  # same weights, metadata updated since
                adapter = copy.copy(hit[1])
                adapter.metadata = AdapterMetadata.model_validate(json.loads(row[1]))
                self._remember(key, blob, adapter)
                return adapter
            try:
                data = self._read_blob(self._blob_path(namespace, blob))
            except FileNotFoundError:
                continue  # replaced or removed since we read the row: ask the index again
            adapter = Adapter.from_bytes(data)
            adapter.metadata = AdapterMetadata.model_validate(json.loads(row[1]))
            self._remember(key, blob, adapter)
            return adapter
        raise AdapterNotFoundError(f"adapter {adapter_id!r} in namespace {namespace!r} kept changing while read")
