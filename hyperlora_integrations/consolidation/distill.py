"""``fit_soft``: the consolidation step with soft targets (a teacher's distribution per token).

Same adapter, same initialisation (``trainer._init``), same functional-LoRA step through
``model.injector.activate_weights`` and the same stopping rules as ``trainer.fit``; only the loss
differs: cross-entropy against the teacher's top-k probabilities at each target position (equal
to the KL divergence to the renormalised top-k teacher, up to a constant), weighted per row. A
one-hot row is ordinary cross-entropy, so few-shot examples and distillation share one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidInputError
from ..lora import Adapter
from .config import ConsolidationConfig
from .skill_targets import SoftSequence
from .trainer import ConsolidationInterrupted, FitResult, _init

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
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    A_full, B_full, first = _init(model, config, init, generator)
    device = model.base.device
    A_train = {k: v[first:].clone().to(device).requires_grad_(True) for k, v in A_full.items()}
    B_train = {k: v[first:].clone().to(device).requires_grad_(True) for k, v in B_full.items()}
    A_low = {k: v[:first].to(device) for k, v in A_full.items()}
    B_low = {k: v[:first].to(device) for k, v in B_full.items()}
    params = [*A_train.values(), *B_train.values()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    scaling = config.scaling if init is None else 1.0  # an init adapter's scaling is folded already
    result = FitResult(A={}, B={})
    order: list[int] = []
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise ConsolidationInterrupted(f"stopped after {step} of {config.steps} steps")
        while len(order) < config.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        batch, order = [rows[i] for i in order[: config.batch_size]], order[config.batch_size :]
        ids, top_ids, top_probs, weights, keep_from = _soft_batch(batch, pad_id, device)
        A = {k: torch.cat([A_low[k], A_train[k]]) for k in A_train}
        B = {k: torch.cat([B_low[k], B_train[k]]) * scaling for k in B_train}
        with torch.enable_grad(), model.injector.activate_weights(A, B):
            keep = torch.arange(keep_from, ids.shape[1] - 1, device=device)
            logits = model.model(input_ids=ids, logits_to_keep=keep).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, top_ids)
            per_position = -(top_probs * logp).sum(-1)
            loss = (per_position * weights).sum() / (weights > 0).sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        result.losses.append(loss.item())
        result.steps = step + 1
        if progress is not None:
            progress(step + 1, result.losses[-1])
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            result.stopped = "time_budget"
            break
    with torch.no_grad():
        result.A = {k: torch.cat([A_low[k], A_train[k].detach()]).cpu() for k in A_train}
        result.B = {k: (torch.cat([B_low[k], B_train[k].detach()]) * scaling).cpu() for k in B_train}
    result.seconds = time.perf_counter() - start
    return result
