"""Which of the retrieved documents' adapters to activate for a question: the ones that explain it.

A retriever returns k documents (LangChain's default is 4) and each verified reference would
activate its document's adapter. Unlike an extra passage in the prompt, an unrelated adapter is
not harmless: it changes the weights. Measured on the fictional fixture, another document's
consolidated adapter raises gold-answer NLL above having no document at all, and k=4 answered
less often than k=1 (docs/doc-to-lora.md, "Several adapters at once").

The adapters themselves tell which documents a question is about. An adapter that carries a
document makes the question's own words (its names, places, numbers) likely; another
document's adapter makes them less likely. So before generation the user's question is scored
under the candidates and they are chosen greedily: the one under which the question is most
likely, then each next one only if adding it makes the question more likely still (by at least
``margin`` nats). A question about two documents keeps both adapters; a question about one
keeps one, whatever k was. The cost is two short forward passes of the question per
candidate, before a generation that takes one forward pass per new token anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..lora import Adapter
    from ..model import HyperLoRAModel
    from .corpus import Resolution

SKIPPED = "skipped"  # ``served_by`` label of a reference whose adapter did not explain the question


def _question_ids(model: HyperLoRAModel, text: str) -> tuple[list[int], int, int]:
    """The chat-encoded user turn and where its content tokens are (whatever the chat template)."""
    full = model.encode([{"role": "user", "content": text}])
    empty = model.encode([{"role": "user", "content": ""}])
    start = 0
    while start < min(len(full), len(empty)) and full[start] == empty[start]:
        start += 1
    tail = 0
    while tail < min(len(full), len(empty)) - start and full[-1 - tail] == empty[-1 - tail]:
        tail += 1
    return full, max(1, start), len(full) - tail


def question_nll(model: HyperLoRAModel, text: str, adapters: Sequence[Adapter]) -> float:
    """Summed NLL (nats) of the user message ``text`` under ``adapters``."""
    ids, start, end = _question_ids(model, text)
    if end <= start:
        return 0.0
    tensor = torch.tensor([ids], device=model.base.device)
    with torch.no_grad(), model.activate(adapters):
        logits = model.model(input_ids=tensor).logits[0, start - 1 : end - 1].float()
    return float(torch.nn.functional.cross_entropy(logits, tensor[0, start:end], reduction="sum"))


def select(model: HyperLoRAModel, text: str, adapters: Sequence[Adapter], *, margin: float = 0.0) -> list[int]:
    """Indices (in order) of the adapters that make ``text`` more likely, chosen greedily."""
    if len(adapters) < 2 or not text.strip():
        return list(range(len(adapters)))
    singles = [question_nll(model, text, [a]) for a in adapters]
    order = sorted(range(len(adapters)), key=singles.__getitem__)
    chosen, current = [order[0]], singles[order[0]]
    for i in order[1:]:
        value = question_nll(model, text, [adapters[j] for j in (*chosen, i)])
        if value < current - margin:
            chosen.append(i)
            current = value
    return sorted(chosen)


def route(model: HyperLoRAModel, resolution: Resolution, text: str | None, *, margin: float = 0.0) -> Resolution:
    """``resolution`` keeping only the reference adapters that explain ``text`` (the user's
    message); the others are reported in ``served`` as "skipped". Nothing changes with fewer
    than two adapters or no text."""
    if text is None or len(resolution.adapters) < 2:
        return resolution
    keep = set(select(model, text, resolution.adapters, margin=margin))
    if len(keep) == len(resolution.adapters):
        return resolution
    served = dict(resolution.served)
    for i, ref in enumerate(resolution.adapter_references):
        if i not in keep:
            served[(ref.namespace, ref.adapter_id)] = SKIPPED
    return replace(
        resolution,
        adapters=[a for i, a in enumerate(resolution.adapters) if i in keep],
        adapter_references=[r for i, r in enumerate(resolution.adapter_references) if i in keep],
        served=served,
    )
