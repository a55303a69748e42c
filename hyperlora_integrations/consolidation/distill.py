"""``fit_soft``: the consolidation step with soft targets (a teacher's distribution per token).

The same loop as ``trainer.fit`` (``trainer.optimise``: initialisation, top-layer training with
the frozen-layer cache, functional-LoRA step, stopping rules); only the rows and the loss
differ: cross-entropy against the teacher's top-k probabilities at each target position (equal
to the KL divergence to the renormalised top-k teacher, up to a constant), weighted per row. A
one-hot row is ordinary cross-entropy, so few-shot examples and distillation share one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidInputError
from ..lora import Adapter
from .config import ConsolidationConfig
from .skill_targets import SoftSequence
from .trainer import FitResult, Logits, optimise

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


def _soft_targets(rows: Sequence[SoftSequence], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every row's target positions concatenated: teacher ids and probabilities (top-k, zero-padded
    to the widest k) and the row's weight at each."""
    k = max(r.top_ids.shape[1] for r in rows)
    top_ids = torch.cat([torch.nn.functional.pad(r.top_ids, (0, k - r.top_ids.shape[1])) for r in rows])
    top_probs = torch.cat([torch.nn.functional.pad(r.top_probs, (0, k - r.top_probs.shape[1])) for r in rows])
    weights = torch.cat([torch.full((len(r.target),), float(r.weight)) for r in rows])
    return top_ids.to(device), top_probs.float().to(device), weights.to(device)


def fit_soft(
    model: HyperLoRAModel,
    rows: Sequence[SoftSequence],
    config: ConsolidationConfig,
    *,
    init: Adapter | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train A/B so the model, with them active, matches each row's target distribution.

    Rows are drawn ``batch_size`` at a time in a seeded shuffled order, reshuffled every pass.
    """
    if not rows:
        raise InvalidInputError("nothing to consolidate: no training rows")
    device = model.base.device
    order: list[int] = []

    def draw(_step: int, generator: torch.Generator) -> list:
        nonlocal order
        while len(order) < config.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        batch, order = [rows[i] for i in order[: config.batch_size]], order[config.batch_size :]
        return batch

    def loss_of(batch: list, logits: Logits) -> torch.Tensor:
        out, at = logits([(r.prompt, r.target) for r in batch])
        top_ids, top_probs, weights = _soft_targets(batch, device)
        logp = torch.log_softmax(out[torch.cat(at)].float(), dim=-1).gather(-1, top_ids)
        per_position = -(top_probs * logp).sum(-1)
        return (per_position * weights).sum() / (weights > 0).sum().clamp(min=1)

    return optimise(
        model,
        config,
        [(r.prompt, r.target) for r in rows],
        draw,
        loss_of,
        init=init,
        seed=seed,
        time_budget_s=time_budget_s,
        progress=progress,
        should_stop=should_stop,
    )
