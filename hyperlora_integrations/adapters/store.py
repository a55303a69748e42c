"""``AdapterStore``: adapters on disk, indexed in SQLite, cached in memory under a byte budget.

Layout of a store directory::

    index.sqlite                       metadata, namespaces, content hashes, source text
    blobs/<namespace>/<id>.safetensors one adapter each (``Adapter.to_bytes``)
    secret                             key for signing references (see ``references``)

A blob is written to a temp file, fsynced and renamed *before* its index row is committed, so a
process killed at any point leaves either no row (an orphan temp file, ignored) or a row whose
blob is complete. ``path=None`` keeps everything in a private temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdapterNotFoundError, InvalidInputError, UnsafeFileError
from ..lora import Adapter, AdapterMetadata

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
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
"""


def check_name(value: str, what: str) -> str:
    """Namespaces and ids become path components: allow only a safe alphabet."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in (".", ".."):
        raise InvalidInputError(f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '-', '.'")
    return value


class AdapterStore:
    """Persistent, namespaced adapter storage shared by retrievers, skills and services."""

    def __init__(self, path: str | os.PathLike | None = None, *, cache_bytes: int = 256 * 2**20) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="hyperlora-store-") if path is None else None
        self.path = Path(self._tmp.name if self._tmp else path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "blobs").mkdir(exist_ok=True)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.RLock()
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path / "index.sqlite", timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        yield conn

    def _blob(self, namespace: str, adapter_id: str) -> Path:
        path = (
            self.path
            / "blobs"
            / check_name(namespace, "namespace")
            / f"{check_name(adapter_id, 'adapter id')}.safetensors"
        )
        return path

    def secret_path(self) -> Path:
        return self.path / "secret"

    # ------------------------------------------------------------------ writes
    def put(self, adapter: Adapter, *, namespace: str = "default", text: str | None = None) -> str:
        """Store ``adapter`` (atomically) and return its id; ``text`` keeps the source for fallback."""
        blob = self._blob(namespace, adapter.id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        data = adapter.to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=blob.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, blob)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = adapter.metadata
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    namespace,
                    adapter.id,
                    meta.kind,
                    meta.content_hash,
                    meta.created_at,
                    adapter.nbytes,
                    meta.model_dump_json(),
                    text,
                ),
            )
        self._remember((namespace, adapter.id), adapter)
        return adapter.id

    def remove(self, adapter_id: str, *, namespace: str = "default") -> None:
        with self._db() as db:
            cur = db.execute("DELETE FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id))
        if cur.rowcount == 0:
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
        self._blob(namespace, adapter_id).unlink(missing_ok=True)
        with self._lock:
            old = self._cache.pop((namespace, adapter_id), None)
            if old is not None:
                self._cached_bytes -= old.nbytes

    # ------------------------------------------------------------------ reads
    def get(self, adapter_id: str, *, namespace: str = "default") -> Adapter:
        key = (namespace, adapter_id)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if not self.contains(adapter_id, namespace=namespace):
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in namespace {namespace!r}")
        blob = self._blob(namespace, adapter_id)
        if blob.is_symlink() or not blob.resolve().is_relative_to((self.path / "blobs").resolve()):
            raise UnsafeFileError(f"{blob} points outside the store")
        adapter = Adapter.load(blob)
        self._remember(key, adapter)
        return adapter

    def contains(self, adapter_id: str, *, namespace: str = "default") -> bool:
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
        with self._db() as db:
            row = db.execute(
                "SELECT text FROM adapters WHERE namespace = ? AND id = ?", (namespace, adapter_id)
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

    def __len__(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    # ------------------------------------------------------------------ cache
    def _remember(self, key: tuple[str, str], adapter: Adapter) -> None:
        with self._lock:
            if key in self._cache:
                self._cached_bytes -= self._cache.pop(key).nbytes
            if adapter.nbytes > self.cache_bytes:
                return
            self._cache[key] = adapter
            self._cached_bytes += adapter.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes


def store_signer(store: AdapterStore, *, ttl: float | None = 3600.0):
    """The reference signer keyed by ``store``'s secret (created on first use)."""
    from .references import ReferenceSigner, load_or_create_secret

    return ReferenceSigner(load_or_create_secret(store.secret_path()), ttl=ttl)
