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
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import secrets
import sqlite3
import stat
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..chat import check_text
from ..errors import AdapterNotFoundError, CheckpointError, HyperLoRAError, InvalidInputError, UnsafeFileError
from ..lora import Adapter, AdapterMetadata
from ..lora.adapter import read_safetensors_header

try:  # POSIX; elsewhere writers are only serialised within one process (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # always used with fullmatch
# a blob is "<id>.<nonce>.safetensors"; stores from before nonces used "<id>.safetensors"
_BLOB_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}(\.[0-9a-f]{16})?\.safetensors")  # fullmatch
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    content_hash TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    text TEXT,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS by_hash ON adapters(namespace, content_hash);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    options TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (namespace, id)
);
CREATE INDEX IF NOT EXISTS jobs_order ON jobs(state, priority, seq);
"""
_RESERVE_BYTES = 2**20  # see ``AdapterStore._ensure_reserve``
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
_SQLITE_WRITE_CODES = {8, 10, 13}  # SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL (primary codes)
# kind -> priority: skills wait until no document does; consolidation (tens of seconds per
# document, while the instant adapter or the text serves it) runs when nothing else waits
JOB_KINDS = {"document": 0, "skill": 1, "consolidate": 2}
_READ_RETRIES = 5


def check_name(value: str, what: str) -> str:
    """Namespaces and ids become path components: allow only a safe alphabet.

    ``fullmatch``, not ``match``: ``$`` also matches before a final newline, which let
    ``"tenant\n"`` and ``"..\n"`` through as names.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidInputError(f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '-', '.'")
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class StoreWriteError(HyperLoRAError, OSError):
    """The store could not write: disk full, quota exceeded, read-only or failing disk.

    Nothing stored is lost (the write is rolled back); ``remove`` still works on a full disk
    (the store keeps a reserve file it gives up for that), so space can be freed through it.
    """


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk refused a write (as opposed to a bug or a bad argument)."""
    if isinstance(exc, StoreWriteError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _SQLITE_WRITE_CODES
        msg = str(exc)
        return "full" in msg or "I/O error" in msg or "readonly" in msg
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS


# Every open store, so a forked child can drop the lock descriptors it inherited (``_forked``).
_STORES: weakref.WeakSet = weakref.WeakSet()


def _forked() -> None:
    """In a child just forked: close the flock'ed descriptors inherited from the parent.

    An ``flock`` belongs to the open file description, which ``fork`` shares: had the child kept
    its copy, the parent's ``close`` would not release the lock, and every writer (the parent's
    and other processes') would wait until the child exited. Closing the copy (never
    ``LOCK_UN``, which would release the parent's lock) leaves the lock to the parent alone.
    """
    for store in list(_STORES):
        store._drop_inherited_fds()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


@dataclass
class Job:
    """One queued piece of background work (see ``AdapterStore.enqueue``)."""

    seq: int
    namespace: str
    id: str
    kind: str
    payload: str
    content_hash: str
    options: dict[str, Any]
    fingerprint: str
    state: str  # "queued" | "running" | "failed"
    owner: str | None
    attempts: int
    error: str | None
    created_at: str


@dataclass
class RecoveryReport:
    """What opening the store cleaned up after an earlier crash."""

    temp_files: int = 0
    orphan_blobs: int = 0
    stale_workers: int = 0
    removed: list[str] = field(default_factory=list)


_JOB_COLUMNS = (
    "seq, namespace, id, kind, payload, content_hash, options, fingerprint, state, owner, attempts, error, created_at"
)


def _job(row: tuple) -> Job:
    return Job(*row[:6], json.loads(row[6]), *row[7:])


class AdapterStore:
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

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._pid != os.getpid():  # forked: never reuse the parent's connections or locks
            self._after_fork()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path / "index.sqlite", timeout=120, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        yield conn

    def _private_index(self) -> None:
        """Create ``index.sqlite`` 0600 before SQLite does (it gives -wal/-shm the same mode) and
        tighten the files of a store made before this, so other users cannot read the source text."""
        index = self.path / "index.sqlite"
        try:
            os.close(os.open(index, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFileError(f"{index} is a symlink; refusing to use it as the store's index") from None
            if _is_write_failure(exc):
                raise StoreWriteError(f"cannot create {index}: {exc.strerror}; free disk space and retry") from None
            raise
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            try:
                st = os.lstat(self.path / name)
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(self.path / name, stat.S_IMODE(st.st_mode) & 0o700)
            except OSError:  # absent, or not ours to change
                pass

    def _drop_inherited_fds(self) -> None:
        """See ``_forked``: runs in a forked child only."""
        for fd in (self._wfd, self._opening_fd, *self._worker_fds.values()):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._opening_fd = None
        self._after_fork()

    def _after_fork(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._conns = []
        self._lock = threading.RLock()
        self._wlock = threading.RLock()
        self._wdepth, self._wfd = 0, None
        self._worker_fds = {}
        self.workers = {}

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: rolled back on any exception (and by SQLite on a crash)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (SQLITE_FULL does); a second ROLLBACK would
                # raise "no transaction is active" and hide the real error.
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive across processes (``flock`` on ``<store>/lock``) and threads; reentrant.

        Every mutation runs under it, so writers are serialised and a read-modify-write cannot
        lose an update. Readers never take it.
        """
        if self._pid != os.getpid():
            self._after_fork()
        with self._wlock:
            if self._wdepth == 0:
                fd = self._opening_fd = os.open(
                    self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
                )
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    self._opening_fd = None
                    os.close(fd)
                    raise
                self._wfd = fd  # set before _opening_fd is cleared: a fork in between sees the fd
                self._opening_fd = None
                self._ensure_reserve()
            self._wdepth += 1
            try:
                yield
            except StoreWriteError:
                raise
            except (OSError, sqlite3.OperationalError) as exc:
                if _is_write_failure(exc):
                    raise StoreWriteError(
                        f"the store at {self.path} could not write ({exc}); nothing was changed. Free disk "
                        "space (store.remove() works even on a full disk) or fix the disk, then retry",
                    ) from exc
                raise
            finally:
                self._wdepth -= 1
                if self._wdepth == 0:
                    fd, self._wfd = self._wfd, None
                    os.close(fd)  # releases the flock

    def _ensure_reserve(self) -> None:
        """Keep ``<store>/reserve`` (1 MiB of allocated blocks), best effort, under the write lock.

        On a full disk even a DELETE needs room (SQLite appends it to the WAL), so without this a
        full store could not be emptied through its own API. ``remove`` gives the reserve up when a
        write fails for lack of space, deletes, and the next write takes the space back.
        """
        path = self.path / "reserve"
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size >= _RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, _RESERVE_BYTES)
            else:  # pragma: no cover - macOS
                os.pwrite(fd, b"\0" * _RESERVE_BYTES, 0)
        except OSError:  # no room now: try again at the next write
            pass
        finally:
            os.close(fd)

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the filesystem; False if there was none to give."""
        try:
            os.unlink(self.path / "reserve")
            return True
        except OSError:
            return False

    def _blob_dir(self, namespace: str) -> Path:
        return self.path / "blobs" / check_name(namespace, "namespace")

    def _blob_path(self, namespace: str, blob: str) -> Path:
        if not isinstance(blob, str) or not _BLOB_RE.fullmatch(blob):
            raise UnsafeFileError(f"index names blob {blob!r}, which is not a store file name")
        return self._blob_dir(namespace) / blob

    def _unlink_blob(self, namespace: str, blob: str) -> None:
        """Delete a replaced/removed blob; a name the store cannot have written is left alone."""
        try:
            path = self._blob_path(namespace, blob)
        except UnsafeFileError:
            return
        if not path.parent.is_symlink():
            path.unlink(missing_ok=True)

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
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
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
    def _write_blob(self, namespace: str, adapter: Adapter) -> str:
        """Write ``adapter`` under a fresh name (temp + fsync + rename + dir fsync); return the name."""
        directory = self._blob_dir(namespace)
        if directory.is_symlink():
            raise UnsafeFileError(f"{directory} is a symlink; refusing to write through it")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{check_name(adapter.id, 'adapter id')}.{secrets.token_hex(8)}.safetensors"
        data = adapter.to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return name

    @staticmethod
    def _row(namespace: str, adapter: Adapter, text: str | None, blob: str) -> tuple:
        meta = adapter.metadata
        return (
            namespace,
            adapter.id,
            meta.kind,
            meta.content_hash,
            meta.created_at,
            adapter.nbytes,
            meta.model_dump_json(),
            text,
            blob,
        )

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
    def _read_blob(self, path: Path) -> bytes:
        """Read a blob without following symlinks anywhere inside the store (no TOCTOU window)."""
        blobs = (self.path / "blobs").resolve()
        if path.parent.is_symlink() or not path.parent.resolve().is_relative_to(blobs):
            raise UnsafeFileError(f"{path.parent} points outside the store")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFileError(f"{path} is a symlink; the store never writes one") from None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFileError(f"{path} is not a regular file")
            if st.st_size > 2**31:
                raise CheckpointError(f"{path} is {st.st_size} bytes, over the 2 GiB adapter limit")
            return f.read()

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

    def contains(self, adapter_id: str, *, namespace: str = "default") -> bool:
        """Whether the adapter is stored (ready); a queued one is not (see ``job``)."""
        with self._db() as db:
            row = db.execute(
                "SELECT 1 FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
        return row is not None

    def find_by_hash(self, content_hash: str, *, namespace: str = "default") -> str | None:
        """The id of an adapter already made from the same content, so it is not made twice."""
        with self._db() as db:
            row = db.execute(
                "SELECT id FROM adapters WHERE namespace = ? AND content_hash = ? LIMIT 1", (namespace, content_hash)
            ).fetchone()
        return row[0] if row else None

    def text(self, adapter_id: str, *, namespace: str = "default") -> str | None:
        """Source text of a stored adapter, or of a document still queued for internalization."""
        with self._db() as db:
            row = db.execute(
                "SELECT text FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT payload FROM jobs WHERE namespace = ? AND id = ? AND kind IN ('document', 'consolidate')",
                    (namespace, adapter_id),
                ).fetchone()
        if row is None:
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
        return row[0]

    def metadata(self, adapter_id: str, *, namespace: str = "default") -> AdapterMetadata:
        with self._db() as db:
            row = db.execute(
                "SELECT metadata FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
        if row is None:
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
        return AdapterMetadata.model_validate(json.loads(row[0]))

    def list(self, *, namespace: str = "default", kind: str | None = None) -> list[AdapterMetadata]:
        query = (
            "SELECT metadata FROM adapters WHERE namespace = ?"
            + (" AND kind = ?" if kind else "")
            + " ORDER BY created_at, id"
        )
        params = (namespace, kind) if kind else (namespace,)
        with self._db() as db:
            return [AdapterMetadata.model_validate(json.loads(r[0])) for r in db.execute(query, params)]

    def namespaces(self) -> list[str]:
        """Every namespace holding an adapter or a queued job."""
        with self._db() as db:
            rows = db.execute("SELECT namespace FROM adapters UNION SELECT namespace FROM jobs ORDER BY 1")
            return [r[0] for r in rows]

    def __len__(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    # ------------------------------------------------------------------ cache
    def _remember(self, key: tuple[str, str], blob: str, adapter: Adapter) -> None:
        with self._lock:
            if key in self._cache:
                self._cached_bytes -= self._cache.pop(key)[1].nbytes
            if adapter.nbytes > self.cache_bytes:
                return
            self._cache[key] = (blob, adapter)
            self._cached_bytes += adapter.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached_bytes -= old[1].nbytes

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cached(self) -> list[tuple[str, str]]:
        """(namespace, id) of the adapters held in memory, least recently used first."""
        with self._lock:
            return list(self._cache)

    # ------------------------------------------------------------------ background jobs
    def enqueue(
        self,
        kind: str,
        adapter_id: str,
        payload: str,
        *,
        namespace: str = "default",
        content_hash: str = "",
        options: Mapping[str, Any] | None = None,
        fingerprint: str = "",
    ) -> bool:
        """Queue work that will produce adapter ``adapter_id``; False if it exists or is queued.

        A job parked as failed is queued again (adding the same document again retries it).

        ``kind`` is "document" (``payload`` is the text to internalize), "skill" (``payload`` is
        the description) or "consolidate" (``payload`` is the text to learn into the adapter
        ``adapter_id``, which may already hold the instant adapter: it is replaced on completion).
        Documents are taken oldest first; skills only when no document waits; consolidations last.
        """
        if kind not in JOB_KINDS:
            raise InvalidInputError(f"job kind must be one of {sorted(JOB_KINDS)}, got {kind!r}")
        check_name(namespace, "namespace")
        check_name(adapter_id, "adapter id")
        check_text(payload, "payload")
        try:
            options_json = json.dumps(dict(options or {}))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"job options must be JSON-serialisable: {exc}") from None
        with self.write_lock(), self._transaction() as db:
            row = db.execute(
                "SELECT metadata FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
            # A stored adapter makes a document or skill job moot; a consolidation job improves
            # the stored (instant) adapter, unless that one is consolidated already.
            if row is not None and (kind != "consolidate" or json.loads(row[0]).get("consolidated")):
                return False
            retried = db.execute(  # adding a document again is how a user retries a failed one
                "UPDATE jobs SET state = 'queued', error = NULL WHERE namespace = ? AND id = ? AND state = 'failed'",
                (namespace, adapter_id),
            ).rowcount
            if retried:
                return True
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (namespace, id, kind, priority, payload, content_hash, options, "
                "fingerprint, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (
                    namespace,
                    adapter_id,
                    kind,
                    JOB_KINDS[kind],
                    payload,
                    content_hash,
                    options_json,
                    fingerprint,
                    _now(),
                ),
            )
        return cur.rowcount == 1

    def jobs(
        self, *, namespace: str | None = None, states: tuple[str, ...] = ("queued", "running"), kind: str | None = None
    ) -> list[Job]:
        """Jobs in ``states`` (oldest first), optionally of one namespace or kind."""
        where = [f"state IN ({','.join('?' * len(states))})"]
        params: list[Any] = list(states)
        if namespace is not None:
            where.append("namespace = ?")
            params.append(namespace)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        with self._db() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq", params)
            return [_job(r) for r in rows]

    def pending(self, *, namespace: str | None = None, kind: str | None = None) -> list[Job]:
        """Queued and running jobs, oldest first: the work not yet done."""
        return self.jobs(namespace=namespace, kind=kind)

    def failed(self, *, namespace: str | None = None) -> list[Job]:
        """Jobs whose work raised; their ``error`` says why. ``retry_failed`` queues them again."""
        return self.jobs(namespace=namespace, states=("failed",))

    def job(self, adapter_id: str, *, namespace: str = "default") -> Job | None:
        with self._db() as db:
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE namespace = ? AND id = ?", (namespace, adapter_id)
            ).fetchone()
        return _job(row) if row else None

    def pending_text(self, adapter_id: str, *, namespace: str = "default") -> str | None:
        """The text of a document whose adapter is not ready (queued, running or failed), else None.

        ``ReferenceResolver`` puts it in the prompt in place of the reference, so the query is
        answered (by context stuffing) before the adapter exists.
        """
        with self._db() as db:
            row = db.execute(
                "SELECT payload FROM jobs WHERE namespace = ? AND id = ? AND kind IN ('document', 'consolidate')",
                (namespace, adapter_id),
            ).fetchone()
        return row[0] if row else None

    def retry_failed(self, *, namespace: str | None = None) -> int:
        """Queue failed jobs again (e.g. after fixing the model); returns how many."""
        with self.write_lock(), self._transaction() as db:
            sql = "UPDATE jobs SET state = 'queued', owner = NULL, error = NULL WHERE state = 'failed'"
            cur = db.execute(sql + (" AND namespace = ?" if namespace else ""), (namespace,) if namespace else ())
        return cur.rowcount

    # --- worker side
    def register_worker(self) -> str:
        """A token naming a live worker: its lock file stays flock'ed until the process dies."""
        token = secrets.token_hex(8)
        with self.write_lock():  # so no ``claim``/recovery sees the file before it is locked
            fd = os.open(
                self.path / "workers" / f"{token}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
            )
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._worker_fds[token] = fd
        return token

    def unregister_worker(self, token: str) -> None:
        """Give a worker's running jobs back to the queue and drop its token."""
        with self.write_lock(), self._transaction() as db:
            db.execute("UPDATE jobs SET state = 'queued', owner = NULL WHERE state = 'running' AND owner = ?", (token,))
        fd = self._worker_fds.pop(token, None)
        (self.path / "workers" / f"{token}.lock").unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)

    def _worker_alive(self, token: str) -> bool | None:
        """True if a live process holds ``token``'s lock; False (and removed) if it died."""
        if token in self._worker_fds:
            return True
        if fcntl is None or not isinstance(token, str) or not _NAME_RE.fullmatch(token):
            return None
        path = self.path / "workers" / f"{token}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the lock we may just have taken
        path.unlink(missing_ok=True)
        return False

    def claim(self, owner: str, *, fingerprint: str | None = None) -> Job | None:
        """Give the next job to ``owner`` (documents oldest first, then skills), or None.

        Jobs left running by dead workers are queued again first: that is how a killed process's
        work is finished after a restart, without being lost.
        """
        with self.write_lock(), self._transaction() as db:
            owners = {r[0] for r in db.execute("SELECT DISTINCT owner FROM jobs WHERE state = 'running'")}
            for dead in [o for o in owners if o != owner and self._worker_alive(o) is False]:
                db.execute(
                    "UPDATE jobs SET state = 'queued', owner = NULL WHERE state = 'running' AND owner = ?", (dead,)
                )
            sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'queued'"
            params: tuple = ()
            if fingerprint is not None:
                sql += " AND fingerprint IN ('', ?)"
                params = (fingerprint,)
            row = db.execute(sql + " ORDER BY priority, seq LIMIT 1", params).fetchone()
            if row is None:
                return None
            job = _job(row)
            db.execute(
                "UPDATE jobs SET state = 'running', owner = ?, attempts = attempts + 1 WHERE seq = ?", (owner, job.seq)
            )
        job.state, job.owner, job.attempts = "running", owner, job.attempts + 1
        return job

    def complete(self, job: Job, adapter: Adapter, *, text: str | None = None) -> bool:
        """Commit ``job``'s adapter and delete the job in one transaction; False if the job is gone.

        A job cancelled (``remove``) or superseded (``put`` of the same id) while it ran is not
        committed, so nothing is ever done twice or resurrected after deletion.
        """
        if adapter.id != job.id:
            raise InvalidInputError(f"job {job.id} produced adapter {adapter.id}")
        with self.write_lock():
            if not self._owns(job):
                return False
            blob = self._write_blob(job.namespace, adapter)
            old = None
            try:
                with self._transaction() as db:
                    if db.execute("DELETE FROM jobs WHERE seq = ? AND owner = ?", (job.seq, job.owner)).rowcount != 1:
                        raise _Gone
                    if job.kind == "consolidate":  # replaces the instant adapter, if there was one
                        old = db.execute(
                            "SELECT blob, id FROM adapters WHERE namespace = ? AND id = ?", (job.namespace, job.id)
                        ).fetchone()
                    db.execute(
                        f"INSERT {'OR REPLACE ' if job.kind == 'consolidate' else ''}INTO adapters (namespace, id, "
                        "kind, content_hash, created_at, nbytes, metadata, text, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        self._row(job.namespace, adapter, text, blob),
                    )
            except _Gone:
                (self._blob_dir(job.namespace) / blob).unlink(missing_ok=True)
                return False
            except BaseException:
                (self._blob_dir(job.namespace) / blob).unlink(missing_ok=True)
                raise
            if old is not None:  # only after the commit: a kill before it leaves the old, whole blob
                self._unlink_blob(job.namespace, old[0] or f"{old[1]}.safetensors")
        self._remember((job.namespace, adapter.id), blob, adapter)
        return True

    def fail(self, job: Job, error: str) -> None:
        """Park a job whose work raised; it is not retried until ``retry_failed``."""
        with self.write_lock(), self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'failed', owner = NULL, error = ? WHERE seq = ? AND owner = ?",
                (error[:2000], job.seq, job.owner),
            )

    def release(self, job: Job) -> None:
        """Give an unfinished job back to the queue (a worker stopping mid-job)."""
        with self.write_lock(), self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL WHERE seq = ? AND owner = ?", (job.seq, job.owner)
            )

    def _owns(self, job: Job) -> bool:
        with self._db() as db:
            row = db.execute("SELECT owner, state FROM jobs WHERE seq = ?", (job.seq,)).fetchone()
        return row is not None and row[0] == job.owner and row[1] == "running"


class _Gone(Exception):
    """The job was cancelled or superseded while it ran."""


def store_signer(store: AdapterStore, *, ttl: float | None = 3600.0):
    """The reference signer keyed by ``store``'s secret (created on first use)."""
    from .references import ReferenceSigner, load_or_create_secret

    path = store.secret_path()
    if path.exists():
        return ReferenceSigner(load_or_create_secret(path), ttl=ttl)
    with store.write_lock():  # serialised with recovery, which removes temp files of killed creators
        return ReferenceSigner(load_or_create_secret(path), ttl=ttl)
