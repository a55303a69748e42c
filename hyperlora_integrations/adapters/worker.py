"""Background internalization ("sleep mode"): a worker drains the store's persistent job queue.

Users add documents faster than a CPU internalizes them and want answers at once. So
``InternalizedCorpus.add_texts(..., background=True)`` only *queues* each document in the store
(``AdapterStore.enqueue``) and returns its id; a ``BackgroundWorker`` thread then internalizes the
queue, documents oldest first, skills (``SkillLibrary.add(..., background=True)``) once no
document waits. Until a document's adapter lands, ``ReferenceResolver`` answers from its text.

The queue lives in the store's SQLite index, not in memory: a process killed with work queued
or half done leaves the jobs there, and the next worker (same or another process) claims them
again; each adapter is committed in the same transaction that deletes its job, so nothing is
lost and nothing is done twice (see ``AdapterStore.claim``/``complete``).

``drain`` runs the queue to empty in the calling thread with a tqdm bar: the CLI's progress view.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..consolidation import ConsolidationConfig, ConsolidationInterrupted
from ..errors import AdapterNotFoundError, InvalidInputError
from .store import AdapterStore, Job

if TYPE_CHECKING:
    from ..lora import Adapter
    from ..model import HyperLoRAModel

log = logging.getLogger(__name__)
_REGISTRY_LOCK = threading.Lock()


class BackgroundWorker:
    """Processes ``store``'s queued jobs with ``model``: in a daemon thread, or inline (``drain``).

    Several workers (threads or processes) may share a store: a job is claimed by exactly one.
    Jobs queued for another base model (by fingerprint) are left to a worker that has it.
    """

    def __init__(self, model: HyperLoRAModel, store: AdapterStore, *, poll_interval: float = 1.0) -> None:
        self.model = model
        self.store = store
        self.poll_interval = poll_interval
        self.processed = 0  # jobs this worker committed
        self.failures = 0  # jobs this worker parked as failed
        self._owner: str | None = None
        self._owner_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    @property
    def owner(self) -> str:
        """This worker's token in the store; its flock'ed file marks the worker alive."""
        with self._owner_lock:
            if self._owner is None:
                self._owner = self.store.register_worker()
            return self._owner

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> BackgroundWorker:
        """Start the daemon thread (idempotent)."""
        _RUNNING.add(self)
        with self._owner_lock:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="hyperlora-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after its current job (a killed process needs no stop: see module doc)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wake(self) -> None:
        """Look at the queue now instead of at the next poll (called after an enqueue)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the store's disk or lock failed; keep the thread, retry after a pause
                log.exception("background worker could not process the queue")
                worked = False
            if not worked:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    # ------------------------------------------------------------------ work
    def run_once(self) -> bool:
        """Claim and finish one job; False when nothing is queued for this worker."""
        job = self.store.claim(self.owner, fingerprint=self.model.fingerprint)
        if job is None:
            return False
        try:
            # A fresh context: no adapter active in the caller can leak into hypernetwork passes.
            adapter, text = contextvars.Context().run(self._make, job)
        except ConsolidationInterrupted:  # stopping (e.g. at exit): the job waits for the next worker
            self.store.release(job)
            return False
        except Exception as exc:  # typed input errors and bugs alike: park the job, keep working
            log.warning("job %s (%s %s/%s) failed: %s", job.seq, job.kind, job.namespace, job.id, exc)
            self.store.fail(job, f"{type(exc).__name__}: {exc}")
            self.failures += 1
            return True
        except BaseException:
            self.store.release(job)
            raise
        if self.store.complete(job, adapter, text=text):
            self.processed += 1
        return True

    def _make(self, job: Job) -> tuple[Adapter, str | None]:
        options: dict[str, Any] = job.options
        if job.kind == "document":
            adapter = self.model.internalize(job.payload, source=str(options.get("source", "")), progress=False)
            adapter.metadata.user_metadata = dict(options.get("user_metadata") or {})
            text: str | None = job.payload
        elif job.kind == "consolidate":
            adapter = self._consolidate(job)
            text = None if options.get("target") == "skill" else job.payload
        elif job.kind == "skill":
            adapter = self.model.generate_skill(job.payload)
            adapter.metadata.kind = "skill"
            adapter.metadata.description = job.payload
            adapter.metadata.skill_name = options.get("skill_name")
            text = None
        else:  # the store refuses other kinds on enqueue; a hand-edited index could still hold one
            raise InvalidInputError(f"unknown job kind {job.kind!r}")
        adapter.metadata.id = job.id
        return adapter, text

    def _consolidate(self, job: Job) -> Adapter:
        """Learn the document into its adapter, from the stored instant adapter when asked to
        (``warm_start``), or from another stored adapter of the namespace (``warm_start_from``).

        A skill's job (``options["target"] == "skill"``, queued by ``SkillLibrary.add(...,
        consolidate="background")``) distils its description instead; the payload is the
        description and the stored instant skill is replaced by the consolidated one."""
        options: dict[str, Any] = job.options
        if options.get("target") == "skill":
            adapter = self.model.generate_skill(
                job.payload, consolidate=True, seed=int(options.get("seed", 0)), should_stop=self._stop.is_set
            )
            adapter.metadata.kind = "skill"
            adapter.metadata.description = job.payload
            adapter.metadata.skill_name = options.get("skill_name")
            return adapter
        start = None
        if options.get("warm_start_from"):
            # A memory job continues the adapter the previous job left (``memory.jobs``). Starting
            # from zero instead would drop everything learned before, so a missing start fails
            # the job (its turns stay served as text) rather than silently forgetting.
            start = self.store.get(str(options["warm_start_from"]), namespace=job.namespace)
        elif options.get("warm_start"):
            try:
                start = self.store.get(job.id, namespace=job.namespace)
            except AdapterNotFoundError:  # no hypernetwork, or deleted meanwhile: start from zero
                start = None
        config = options.get("config")
        adapter = self.model.consolidate(
            job.payload,
            start,
            config=ConsolidationConfig.model_validate(config) if config else None,
            seed=int(options.get("seed", 0)),
            progress=False,
            source=str(options.get("source", "")),
            should_stop=self._stop.is_set,
        )
        adapter.metadata.user_metadata = dict(options.get("user_metadata") or {})
        return adapter

    def _ours(self) -> list[Job]:
        return [j for j in self.store.pending() if j.fingerprint in ("", self.model.fingerprint)]

    def drain(self, *, progress: bool = False, timeout: float | None = None) -> int:
        """Process the queue in this thread until no job for this model is queued or running.

        Jobs running in other threads or processes are waited for (their worker may die, and
        then this call claims them). Returns how many jobs this call finished; raises
        ``TimeoutError`` if work remains after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        seen = {j.seq for j in self._ours()}
        with tqdm(desc="internalizing queue", unit="job", disable=not progress) as bar:
            while True:
                worked = self.run_once()
                done += worked
                left = self._ours()
                current = {j.seq for j in left}
                seen |= current
                bar.total = len(seen)
                bar.n = len(seen - current)
                bar.set_postfix(pending=len(left), failed=len(self.store.failed()), refresh=False)
                bar.refresh()
                if not left:
                    return done
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{len(left)} jobs still pending after {timeout} s")
                if not worked:  # all remaining jobs are being run by someone else
                    time.sleep(0.05)


_RUNNING: weakref.WeakSet[BackgroundWorker] = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    """Stop background threads before the interpreter tears down torch under them.

    A consolidation in progress stops at its next step and its job goes back to the queue (the
    next process's worker redoes it); without this, a daemon thread inside a torch op at exit
    aborts the process ("terminate called without an active exception").
    """
    workers = list(_RUNNING)
    for worker in workers:
        worker._stop.set()
        worker._wake.set()
    for worker in workers:
        thread = worker._thread
        if thread is not None and thread.is_alive():
            thread.join(30)


def worker_for(model: HyperLoRAModel, store: AdapterStore) -> BackgroundWorker:
    """The one worker of ``store`` for ``model`` in this process (created, not started)."""
    with _REGISTRY_LOCK:
        worker = store.workers.get(id(model))
        if worker is None or worker.model is not model:
            worker = store.workers[id(model)] = BackgroundWorker(model, store)
        return worker


def drain(
    target: Any,
    *,
    model: HyperLoRAModel | None = None,
    progress: bool = True,
    timeout: float | None = None,
) -> int:
    """Finish every queued job now, with a tqdm bar: for the ``hyperlora`` CLI and scripts.

    ``target`` is an ``InternalizedCorpus``, a ``SkillLibrary`` (anything with ``.model`` and
    ``.store``) or an ``AdapterStore`` together with ``model``.
    """
    if isinstance(target, AdapterStore):
        store = target
        if model is None:
            raise InvalidInputError("drain(store) needs model=: the queue's work runs the hypernetworks")
    elif isinstance(getattr(target, "store", None), AdapterStore) and getattr(target, "model", None) is not None:
        store, model = target.store, model or target.model
    else:
        raise InvalidInputError(f"cannot drain a {type(target).__name__}: pass a corpus, skill library or store")
    return worker_for(model, store).drain(progress=progress, timeout=timeout)
