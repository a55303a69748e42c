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
from .trainer import FitResult, Logits, optimise, pad_token_id

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


def _soft_batch(rows: Sequence[SoftSequence], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids; per kept position the target ids, probabilities and row weight.

    Positions are those from the shortest prompt's last token on (logits at ``i`` predict token
    ``i + 1``); a position that is not a target has probability 0 everywhere, so it adds nothing.
    """
    width = max(len(r.prompt) + len(r.target) for r in rows)
    keep_from = min(len(r.prompt) for r in rows) - 1
    span = width - 1 - keep_from
    k = max(r.top_ids.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    top_ids = torch.zeros((len(rows), span, k), dtype=torch.long)
    top_probs = torch.zeros((len(rows), span, k))
    weights = torch.zeros((len(rows), span))
    for row, r in enumerate(rows):
        n_prompt, n_target = len(r.prompt), len(r.target)
        ids[row, : n_prompt + n_target] = torch.tensor(r.prompt + r.target)
        first = n_prompt - 1 - keep_from
        kk = r.top_ids.shape[1]
        top_ids[row, first : first + n_target, :kk] = r.top_ids
        top_probs[row, first : first + n_target, :kk] = r.top_probs
        weights[row, first : first + n_target] = r.weight
    return ids.to(device), top_ids.to(device), top_probs.to(device), weights.to(device), keep_from


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
    pad_id, device = pad_token_id(model), model.base.device
    order: list[int] = []

    def draw(_step: int, generator: torch.Generator) -> list:
        nonlocal order
        while len(order) < config.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        batch, order = [rows[i] for i in order[: config.batch_size]], order[config.batch_size :]
        return batch

    def loss_of(batch: list, logits: Logits) -> torch.Tensor:
        ids, top_ids, top_probs, weights, keep_from = _soft_batch(batch, pad_id, device)
        keep = torch.arange(keep_from, ids.shape[1] - 1, device=device)
        out = logits(ids, keep, [(r.prompt, r.target) for r in batch]).float()
        logp = torch.log_softmax(out, dim=-1).gather(-1, top_ids)
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
