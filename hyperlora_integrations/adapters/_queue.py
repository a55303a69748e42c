"""The persistent queue of background work: the ``jobs`` table of the index.

Documents to internalize, skills to generate and documents to consolidate wait here, taken in
``JOB_KINDS`` priority order. A job is claimed by a worker that holds a per-worker file lock
(``workers/<token>.lock``); if that worker dies, the kernel drops its lock and the next ``claim``
gives the job to someone else. A job's adapter is committed in the same transaction that deletes
the job, so a job is finished exactly once, and never after it was cancelled or superseded.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..chat import check_text
from ..errors import InvalidInputError
from ..lora import Adapter
from ._blobs import _NAME_RE, check_name
from ._index import fcntl

# kind -> priority: skills wait until no document does; consolidation (tens of seconds per
# document, while the instant adapter or the text serves it) runs when nothing else waits
JOB_KINDS = {"document": 0, "skill": 1, "consolidate": 2}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


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


_JOB_COLUMNS = (
    "seq, namespace, id, kind, payload, content_hash, options, fingerprint, state, owner, attempts, error, created_at"
)


def _job(row: tuple) -> Job:
    return Job(*row[:6], json.loads(row[6]), *row[7:])


class QueueMixin:
    """``AdapterStore``'s job queue: the producer side (``enqueue`` and the queries) and the
    worker side (tokens, ``claim``, ``complete``, ``fail``, ``release``). The state it uses is
    set up by ``AdapterStore.__init__``."""

    path: Path
    _worker_fds: dict[str, int]

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
