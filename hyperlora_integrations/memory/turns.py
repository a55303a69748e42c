"""``TurnLog``: every message of every conversation, durable before ``append`` returns.

The log is the memory's source of truth. Turns are never rewritten or dropped when they are
consolidated: the adapter only changes how they are *served* (which turns the prompt still needs
as text). So a process killed at any instant -- mid-append, mid-consolidation, mid-commit of an
adapter -- loses nothing that was acknowledged: an append is one SQLite transaction, committed in
WAL mode with ``synchronous=FULL`` (fsynced) before the call returns, and no other code path
writes turns. Only ``delete`` (a user's "forget") removes them.

It lives in its own file next to the adapter store's index (``<store>/memory.sqlite``), created
0600 like the index: it holds what users said. ``secure_delete`` is on, so forgotten turns are
overwritten in the file rather than left in free pages; ``delete`` then truncates the WAL.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..adapters._index import close_all, connect, immediate
from ..errors import UnsafeFileError

FILENAME = "memory.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    user_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    extra TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_namespace ON turns(namespace, seq);
"""
_COLUMNS = "seq, role, content, tokens, extra, created_at"


@dataclass(frozen=True)
class Turn:
    """One stored message. ``seq`` grows with every append in the log (across namespaces)."""

    seq: int
    role: str
    content: str
    tokens: int
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _turn(row: tuple) -> Turn:
    seq, role, content, tokens, extra, created = row
    return Turn(seq, role, content, tokens, created, json.loads(extra))


class TurnLog:
    """The ``turns`` table of ``<directory>/memory.sqlite``; safe across threads and processes."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / FILENAME
        self._create_private()
        self._local = threading.local()
        self._pid = os.getpid()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _create_private(self) -> None:
        """Create the file 0600 before SQLite does (its -wal/-shm then get the same mode)."""
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFileError(f"{self.path} is a symlink; refusing to keep conversations in it") from None
            raise

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._pid != os.getpid():  # forked: never reuse the parent's connections
            self._pid, self._local, self._conns = os.getpid(), threading.local(), []
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        yield conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db, immediate(db):
            yield db

    # ------------------------------------------------------------------ writes
    def append(
        self,
        namespace: str,
        user_id: str,
        thread_id: str,
        rows: Sequence[tuple[str, str, int, dict[str, Any]]],
    ) -> list[Turn]:
        """Store ``(role, content, tokens, extra)`` rows in one transaction, fsynced on return."""
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        out = []
        with self._transaction() as db:
            for role, content, tokens, extra in rows:
                cur = db.execute(
                    "INSERT INTO turns (namespace, user_id, thread_id, role, content, tokens, extra, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (namespace, user_id, thread_id, role, content, int(tokens), json.dumps(extra), now),
                )
                out.append(Turn(int(cur.lastrowid), role, content, int(tokens), now, dict(extra)))
        return out

    def delete(self, namespace: str) -> int:
        """Remove every turn of ``namespace``; the freed pages are zeroed and the WAL truncated."""
        with self._transaction() as db:
            n = db.execute("DELETE FROM turns WHERE namespace = ?", (namespace,)).rowcount
        self.checkpoint()
        return n

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it (best effort: a reader may hold it)."""
        with self._db() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------------------ reads
    def turns(self, namespace: str, *, after: int = 0, through: int | None = None) -> list[Turn]:
        """Turns with ``after < seq <= through``, oldest first."""
        sql = f"SELECT {_COLUMNS} FROM turns WHERE namespace = ? AND seq > ?"
        params: list[Any] = [namespace, after]
        if through is not None:
            sql += " AND seq <= ?"
            params.append(through)
        with self._db() as db:
            return [_turn(r) for r in db.execute(sql + " ORDER BY seq", params)]

    def select(self, namespace: str, seqs: Sequence[int]) -> list[Turn]:
        """The turns with these ``seqs`` (of this namespace only), oldest first."""
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))
        with self._db() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM turns WHERE namespace = ? AND seq IN ({marks}) ORDER BY seq",
                [namespace, *seqs],
            )
            return [_turn(r) for r in rows]

    def sizes(self, namespace: str, *, newest_first: bool = False, through: int | None = None) -> list[tuple]:
        """``(seq, role, tokens)`` of the namespace's turns: what window and batch decisions need."""
        sql = "SELECT seq, role, tokens FROM turns WHERE namespace = ?"
        params: list[Any] = [namespace]
        if through is not None:
            sql += " AND seq <= ?"
            params.append(through)
        with self._db() as db:
            return list(db.execute(sql + f" ORDER BY seq {'DESC' if newest_first else 'ASC'}", params))

    def window_start(self, namespace: str, budget: int) -> int | None:
        """The ``seq`` of the oldest turn in the recent window (None: no turns).

        The window is the longest run of newest turns whose tokens fit in ``budget``, and always
        holds the latest turn. Read newest first, stopping at the first turn that does not fit,
        so the cost is the window's size, not the conversation's.
        """
        start, used = None, 0
        with self._db() as db:
            for seq, tokens in db.execute(
                "SELECT seq, tokens FROM turns WHERE namespace = ? ORDER BY seq DESC", (namespace,)
            ):
                if start is not None and used + tokens > budget:
                    break
                start, used = seq, used + tokens
        return start

    def count(self, namespace: str) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM turns WHERE namespace = ?", (namespace,)).fetchone()[0]

    def namespaces(self) -> list[tuple[str, str, str]]:
        """``(namespace, user_id, thread_id)`` of every conversation with turns."""
        with self._db() as db:
            return list(db.execute("SELECT DISTINCT namespace, user_id, thread_id FROM turns ORDER BY 2, 3"))

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        close_all(conns)
        self._local = threading.local()
