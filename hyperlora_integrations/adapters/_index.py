"""The store's SQLite index and the write lock every mutation holds (``store.py`` has the layout).

``index.sqlite`` holds the adapters table (metadata, namespaces, content hashes, source text, the
blob each row names) and the job queue. It runs in WAL mode, so readers never wait for the
writer and see the last committed state, while writers are serialised by ``write_lock`` (an
``flock`` across processes, an ``RLock`` across threads). The commit that switches a row is the
single switch point of every write, which is why a crash at any instant leaves a consistent store.

The rest of this module guards those two resources: a forked child drops the lock descriptors it
inherited (``_forked``), a 1 MiB reserve lets ``remove`` work on a full disk, and every write the
disk refuses becomes one type, ``StoreWriteError``.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AdapterNotFoundError, HyperLoRAError, UnsafeFileError
from ..lora import Adapter, AdapterMetadata


def connect(path: Path) -> sqlite3.Connection:
    """A connection for one thread, in autocommit mode (transactions are ``immediate``), durable
    writes (WAL, synchronous FULL) and deleted rows overwritten on disk."""
    conn = sqlite3.connect(path, timeout=120, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # Deleted rows (a removed document's text, a forgotten conversation) are overwritten,
    # not left readable in free pages; the default depends on how SQLite was built.
    conn.execute("PRAGMA secure_delete=ON")
    return conn


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on ``db``, rolled back on any exception.

    SQLite may already have rolled back (SQLITE_FULL does); a second ROLLBACK would raise "no
    transaction is active" and hide the real error, so it is only issued inside a transaction.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def close_all(conns: list[sqlite3.Connection]) -> None:
    """Close every connection, ignoring ones SQLite already considers broken."""
    for conn in conns:
        try:
            conn.close()
        except sqlite3.Error:
            pass


try:  # POSIX; elsewhere writers are only serialised within one process (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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


class IndexMixin:
    """``AdapterStore``'s connections, transactions, write lock and reserve, and its reads of the
    index alone (no blob is opened). The state it uses is set up by ``AdapterStore.__init__``."""

    path: Path
    _local: threading.local
    _conns: list[sqlite3.Connection]
    _lock: threading.RLock
    _wlock: threading.RLock
    _wdepth: int
    _wfd: int | None
    _pid: int
    _opening_fd: int | None
    _worker_fds: dict[str, int]
    workers: dict[int, Any]

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._pid != os.getpid():  # forked: never reuse the parent's connections or locks
            self._after_fork()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path / "index.sqlite")
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
        with self._db() as db, immediate(db):
            yield db

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

    # ------------------------------------------------------------------ reads of the index alone
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
