"""``ConversationMemory``: one conversation's recent turns as text, older turns in an adapter.

``MemoryManager`` (manager.py) serves many conversations from one ``AdapterStore``;
``manager.memory(user_id, thread_id)`` is one conversation's ``ConversationMemory``. Every
message is appended to the durable ``TurnLog`` before ``add_*`` returns. The prompt then gets:

- the recent window: the newest turns within ``MemoryConfig.recent_tokens``;
- every older turn the memory adapter does not hold yet, as text too (a job is queued for them,
  or running): nothing said is ever unavailable, it is only served one way or the other;
- the memory adapter ``mem-<seq>``, holding every turn up to ``<seq>``.

Older turns are learned by the store's job queue (``kind="consolidate"``, the same queue and
background worker as documents), one job at a time per conversation, each warm-started from the
previous adapter (``warm_start_from``). Each conversation has its own store namespace, derived
from a hash of (user, thread): adapters are looked up only in the caller's namespace, so one
user's memory cannot be activated for another. ``forget()`` deletes the conversation's turns,
adapters and jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..adapters.references import strip_references
from ..adapters.store import AdapterStore, store_signer
from ..chat import check_text
from ..errors import AdapterNotFoundError, InvalidInputError
from ..lora import Adapter, content_hash
from . import jobs
from .config import MemoryConfig
from .turns import Turn, TurnLog

if TYPE_CHECKING:
    from ..model import HyperLoRAModel

logger = logging.getLogger(__name__)
_ROLES = ("system", "user", "assistant", "tool")
_JOB_STATES = ("queued", "running", "failed")


def memory_namespace(user_id: str, thread_id: str | None = None) -> str:
    """The store namespace of a conversation: a hash, so any user or thread id is safe and two
    different (user, thread) pairs can never share one (``"a.b"+"c"`` vs ``"a"+"b.c"``)."""
    if not isinstance(user_id, str) or not user_id:
        raise InvalidInputError(f"user_id must be a non-empty str, got {user_id!r}")
    if thread_id is not None and (not isinstance(thread_id, str) or not thread_id):
        raise InvalidInputError(f"thread_id must be a non-empty str or None, got {thread_id!r}")
    key = f"{user_id}\x00{'' if thread_id is None else thread_id}".encode()
    return "memory-" + hashlib.blake2b(key, digest_size=16).hexdigest()


def message_overhead(model: HyperLoRAModel) -> int:
    """Tokens the chat template adds around one message (role markers), measured on the model."""
    one = model.encode([{"role": "user", "content": "a"}], add_generation_prompt=False)
    two = model.encode(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], add_generation_prompt=False
    )
    return max(0, len(two) - len(one) - model.count_tokens("b"))


@dataclass(frozen=True)
class MemoryStatus:
    """Where one conversation's memory stands (``ConversationMemory.status``)."""

    turns: int
    window_turns: int
    consolidated_through: int
    consolidated_turns: int
    text_turns: int  # in the prompt as text: the window plus turns not learned yet
    jobs: dict[str, int]
    adapter_id: str | None
    adapter_bytes: int
    errors: tuple[str, ...] = ()


class ConversationMemory:
    """One user's (or thread's) memory: the durable turns, the recent window and the adapter."""

    def __init__(
        self,
        model: HyperLoRAModel,
        store: AdapterStore,
        *,
        user_id: str,
        thread_id: str | None = None,
        config: MemoryConfig | None = None,
        log: TurnLog | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.user_id, self.thread_id = user_id, thread_id
        self.namespace = memory_namespace(user_id, thread_id)
        self.config = config or MemoryConfig()
        self.log = log if log is not None else TurnLog(store.path)
        self.overhead = message_overhead(model)
        self._schedule_lock = threading.Lock()
        self.schedule()  # a restart picks up turns that left the window before it

    # ------------------------------------------------------------------ writing
    def add_message(self, role: str, content: str, *, extra: Mapping[str, Any] | None = None) -> Turn:
        """Store one message durably (fsynced before this returns), then queue any overflow."""
        return self.add_messages([{"role": role, "content": content, "extra": dict(extra or {})}])[0]

    def add_turn(self, user: str, assistant: str) -> list[Turn]:
        """A user message and the reply, stored together in one transaction."""
        return self.add_messages([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    def add_messages(self, messages: Iterable[Mapping[str, Any] | tuple[str, str]]) -> list[Turn]:
        """Store messages (``{"role", "content"[, "extra"]}`` or ``(role, content)``) atomically.

        Once they are stored, a failure to queue consolidation (a full disk, say) is logged, not
        raised: the turns are kept and served as text, and the next call queues the job.

        Reference-shaped strings are removed from the text first: a signed reference in a stored
        turn would be replayed into later prompts (and other users' prompts, if copied).
        """
        rows = []
        for message in messages:
            if isinstance(message, tuple) and len(message) == 2:
                message = {"role": message[0], "content": message[1]}
            if not isinstance(message, Mapping):
                raise InvalidInputError(f"a message is a {{'role', 'content'}} mapping or a pair, got {message!r}")
            role, content = message.get("role"), message.get("content")
            if role not in _ROLES:
                raise InvalidInputError(f"message role must be one of {_ROLES}, got {role!r}")
            content, _ = strip_references(check_text(content, "message content"))
            extra = dict(message.get("extra") or {})
            try:
                json.dumps(extra)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"a message's extra must be JSON-serialisable: {exc}") from None
            rows.append((role, content, self.model.count_tokens(content) + self.overhead, extra))
        if not rows:
            return []
        turns = self.log.append(self.namespace, self.user_id, self.thread_id or "", rows)
        try:
            self.schedule()
        except Exception:  # the turns are stored: raising would make callers add them twice
            logger.warning(
                "memory %s: could not queue consolidation; retried at the next add", self.namespace, exc_info=True
            )
        return turns

    # ------------------------------------------------------------------ reading
    def turns(self) -> list[Turn]:
        """Every stored turn, oldest first (consolidated ones included: nothing is dropped)."""
        return self.log.turns(self.namespace)

    def _latest(self) -> tuple[int, str | None]:
        """(watermark, adapter id) of the newest memory adapter; older generations are removed.

        A new adapter supersedes the one it was warm-started from as soon as it is committed;
        the old one is deleted here, by whoever looks next, so the byte budget holds on disk too.
        """
        ids = [(jobs.through_of(m.id), m.id) for m in self.store.list(namespace=self.namespace)]
        ids = sorted((t, i) for t, i in ids if t is not None)
        if not ids:
            return 0, None
        for _, old in ids[:-1]:
            try:
                self.store.remove(old, namespace=self.namespace)
            except AdapterNotFoundError:  # another process removed it first
                pass
        return ids[-1]

    @property
    def watermark(self) -> int:
        """The last turn (by ``seq``) the memory adapter holds; 0 before the first job lands."""
        return self._latest()[0]

    def adapter(self) -> Adapter | None:
        """The memory adapter (None until the first consolidation lands)."""
        for _ in range(3):
            _, adapter_id = self._latest()
            if adapter_id is None:
                return None
            try:
                return self.store.get(adapter_id, namespace=self.namespace)
            except AdapterNotFoundError:  # superseded between the listing and the read
                continue
        return None

    def adapters(self) -> list[Adapter]:
        """``[adapter]`` or ``[]``: what to pass as ``adapters=`` to a generation call."""
        adapter = self.adapter()
        return [adapter] if adapter is not None else []

    def window_start(self) -> int | None:
        return self.log.window_start(self.namespace, self.config.recent_tokens)

    def recent(self) -> list[Turn]:
        """The recent window only: the newest turns within ``recent_tokens``."""
        start = self.window_start()
        return [] if start is None else self.log.turns(self.namespace, after=start - 1)

    def prompt_turns(self, watermark: int | None = None) -> list[Turn]:
        """The turns the prompt needs as text: the window, and any older turn not learned yet."""
        start = self.window_start()
        if start is None:
            return []
        mark = self.watermark if watermark is None else watermark
        return self.log.turns(self.namespace, after=min(mark, start - 1))

    def messages(self) -> list[dict[str, str]]:
        """``prompt_turns`` as chat messages, oldest first."""
        return [t.as_message() for t in self.prompt_turns()]

    def context(self) -> tuple[list[dict[str, str]], list[Adapter]]:
        """(messages, adapters) read consistently: the adapter first, then the turns it lacks.

        Read in that order, a job landing in between can only leave a turn in both the adapter
        and the text, never in neither.
        """
        for _ in range(3):
            mark, adapter_id = self._latest()
            if adapter_id is None:
                return [t.as_message() for t in self.prompt_turns(0)], []
            try:
                adapter = self.store.get(adapter_id, namespace=self.namespace)
            except AdapterNotFoundError:  # superseded between the listing and the read: look again
                continue
            return [t.as_message() for t in self.prompt_turns(mark)], [adapter]
        return [t.as_message() for t in self.prompt_turns(0)], []  # every turn as text

    def reference(self, ttl: float | None = 3600.0) -> str | None:
        """A signed reference to the memory adapter, for LLM wrappers that resolve references."""
        _, adapter_id = self._latest()
        if adapter_id is None:
            return None
        return store_signer(self.store, ttl=ttl).issue(self.namespace, adapter_id)

    def status(self) -> MemoryStatus:
        mark, adapter_id = self._latest()
        sizes = self.log.sizes(self.namespace)
        start = self.window_start()
        counts = dict.fromkeys(_JOB_STATES, 0)
        errors = []
        for job in self.store.jobs(namespace=self.namespace, states=_JOB_STATES):
            counts[job.state] += 1
            if job.error:
                errors.append(job.error)
        nbytes = 0
        if adapter_id is not None:
            try:
                nbytes = self.store.get(adapter_id, namespace=self.namespace).nbytes
            except AdapterNotFoundError:
                pass
        window = 0 if start is None else sum(1 for s, _, _ in sizes if s >= start)
        text_from = 0 if start is None else min(mark, start - 1)
        return MemoryStatus(
            turns=len(sizes),
            window_turns=window,
            consolidated_through=mark,
            consolidated_turns=sum(1 for s, _, _ in sizes if s <= mark),
            text_turns=sum(1 for s, _, _ in sizes if s > text_from),
            jobs=counts,
            adapter_id=adapter_id,
            adapter_bytes=nbytes,
            errors=tuple(errors),
        )

    # ------------------------------------------------------------------ consolidation
    def schedule(self, *, flush: bool = False) -> str | None:
        """Queue the next consolidation job if ``min_job_tokens`` of turns (``flush``: any) wait
        outside the window; returns its adapter id.

        One job at a time per conversation (each is warm-started from the one before), decided
        under the store's write lock so two processes cannot queue rival jobs. A failed job stays
        parked (its turns stay text) until ``retry()``.
        """
        start = self.window_start()
        if start is None or self._next_job(start, flush) is None:  # the common case: no lock taken
            return None
        with self._schedule_lock, self.store.write_lock():
            found = self._next_job(start, flush)
            if found is None:
                return None
            job, previous = found
            recipe = self.config.recipe(self.model.consolidation_config)
            self.store.enqueue(
                "consolidate",
                job.adapter_id,
                job.text,
                namespace=self.namespace,
                content_hash=content_hash(job.text),
                fingerprint=self.model.fingerprint,
                options={
                    "warm_start_from": previous,
                    "config": recipe.model_dump(mode="json"),
                    "seed": self.config.seed + job.through,
                    "source": "memory",
                    "user_metadata": {
                        "memory": {
                            "through": job.through,
                            "new": len(job.new),
                            "replay": len(job.replay),
                            "warm_start_from": previous,
                        }
                    },
                },
            )
        if self.config.background:
            self.worker.start().wake()
        return job.adapter_id

    def _next_job(self, start: int, flush: bool) -> tuple[jobs.JobPlan, str | None] | None:
        """The job to queue now and the adapter it starts from; None while one is pending."""
        if self.store.jobs(namespace=self.namespace, states=_JOB_STATES):
            return None
        mark, previous = self._latest()
        job = jobs.plan(
            self.log,
            self.namespace,
            watermark=mark,
            window_start=start,
            job_tokens=self.config.job_tokens,
            replay_tokens=self.config.replay_tokens,
            seed=self.config.seed,
            min_tokens=1 if flush else self.config.min_job_tokens,
        )
        return None if job is None else (job, previous)

    @property
    def worker(self):
        """The store's background worker for this model (shared with documents and skills)."""
        from ..adapters.worker import worker_for

        return worker_for(self.model, self.store)

    def consolidate_now(self, *, timeout: float | None = None, progress: bool = False) -> int:
        """Learn every turn outside the window now, in this thread; returns the jobs finished."""
        done = 0
        while True:
            self.schedule(flush=True)
            if not self.store.jobs(namespace=self.namespace, states=("queued", "running")):
                return done
            done += self.worker.drain(progress=progress, timeout=timeout)

    def retry(self) -> int:
        """Queue this conversation's failed job again (after fixing its cause)."""
        return self.store.retry_failed(namespace=self.namespace)

    def forget(self) -> int:
        """Delete this conversation from disk: its turns, adapters and queued or running jobs.

        A job running right now is not committed when it finishes (the store drops the work of
        a cancelled job). Returns the number of turns deleted.
        """
        with self.store.write_lock():
            for job in self.store.jobs(namespace=self.namespace, states=_JOB_STATES):
                try:
                    self.store.remove(job.id, namespace=self.namespace)
                except AdapterNotFoundError:
                    pass
            for meta in self.store.list(namespace=self.namespace):
                self.store.remove(meta.id, namespace=self.namespace)
            deleted = self.log.delete(self.namespace)
            blobs = self.store.path / "blobs" / self.namespace
            if blobs.is_dir() and not blobs.is_symlink() and not any(blobs.iterdir()):
                blobs.rmdir()
            _checkpoint(self.store)
        return deleted

    # ------------------------------------------------------------------ convenience
    def chat(self, message: str, *, system: str | None = None, **sampling: Any) -> str:
        """Store ``message``, answer it with the memory (window + pending text + adapter), store
        the answer and return it: the whole loop for code without a framework."""
        self.add_message("user", message)
        messages, adapters = self.context()
        answer = self.model.generate(messages, adapters, system=system, **sampling)
        self.add_message("assistant", answer)
        return answer


def _checkpoint(store: AdapterStore) -> None:
    """Fold the store index's WAL into the database and truncate it, so rows just deleted do not
    linger in old WAL frames. Best effort: a reader holding a snapshot keeps the WAL."""
    try:
        conn = sqlite3.connect(store.path / "index.sqlite", timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error:
        pass
