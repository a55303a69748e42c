"""``SkillLibrary``: named skill adapters with their descriptions, persisted and routable.

Routing compares a request with every skill's description by cosine similarity of the same
embedding Text-to-LoRA reads (the base model's mean-pooled middle-layer state), so no extra
model is needed. A skill is only picked when it beats ``threshold``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .adapters.store import AdapterStore, check_name
from .encoders.description import DescriptionEncoder
from .errors import AdapterNotFoundError, InvalidInputError
from .lora import Adapter

if TYPE_CHECKING:
    from .model import HyperLoRAModel


@dataclass
class Skill:
    name: str
    description: str
    adapter: Adapter


class SkillLibrary:
    def __init__(
        self,
        model: HyperLoRAModel,
        store: AdapterStore | None = None,
        *,
        namespace: str = "skills",
        threshold: float = 0.5,
    ) -> None:
        self.model = model
        self.store = store if store is not None else AdapterStore()
        self.namespace = check_name(namespace, "namespace")
        self.threshold = threshold
        self._encoder = DescriptionEncoder(model.model, model.tokenizer)
        self._lock = threading.Lock()
        self._skills: dict[str, Skill] = {}
        self._emb: dict[str, torch.Tensor] = {}
        for meta in self.store.list(namespace=self.namespace, kind="skill"):
            name = (meta.model_extra or {}).get("skill_name")
            if name:
                self._index(Skill(name, meta.description, self.store.get(meta.id, namespace=self.namespace)))

    def _index(self, skill: Skill) -> None:
        with self._lock:
            self._skills[skill.name] = skill
            self._emb[skill.name] = self._encoder.encode(skill.description)

    def add(self, name: str, description: str, adapter: Adapter | None = None) -> Skill:
        """Register a skill; without ``adapter`` it is generated from ``description`` (T2L)."""
        check_name(name, "skill name")
        if not isinstance(description, str) or not description.strip():
            raise InvalidInputError("a skill needs a non-empty description")
        if name in self._skills:
            self.remove(name)
        adapter = adapter if adapter is not None else self.model.generate_skill(description)
        adapter.metadata.kind = "skill"
        adapter.metadata.description = description
        adapter.metadata.skill_name = name
        self.store.put(adapter, namespace=self.namespace)
        skill = Skill(name, description, adapter)
        self._index(skill)
        return skill

    def remove(self, name: str) -> None:
        with self._lock:
            skill = self._skills.pop(name, None)
            self._emb.pop(name, None)
        if skill is None:
            raise AdapterNotFoundError(f"no skill named {name!r}")
        self.store.remove(skill.adapter.id, namespace=self.namespace)

    def get(self, name: str) -> Skill:
        try:
            return self._skills[name]
        except KeyError:
            raise AdapterNotFoundError(f"no skill named {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._skills)

    def __len__(self) -> int:
        return len(self._skills)

    def scores(self, request: str) -> list[tuple[str, float]]:
        """Cosine similarity of ``request`` to every skill description, best first."""
        if not self._skills:
            return []
        query = self._encoder.encode(request)
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
