"""The consolidation training loop: fit a LoRA adapter to (prompt, target) token sequences.

Read top to bottom: shapes, initialisation, the step (padded batch -> masked cross-entropy ->
Adam), the stopping rule, the result. The base model stays frozen and shared: the adapter is
applied through the injector's per-call scope, so other threads keep serving requests with
their own adapters while this runs in the background.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidInputError
from ..lora import Adapter
from . import packing
from .config import ConsolidationConfig
from .frozen import FrozenPrefix

if TYPE_CHECKING:
    from ..model import HyperLoRAModel

Sequences = Sequence[tuple[list[int], list[int]]]  # (prompt ids, target ids)


class ConsolidationInterrupted(Exception):
    """``should_stop`` asked a fit to stop (a worker shutting down); nothing was produced."""


@dataclass
class FitResult:
    """The fitted A/B (scaling folded into B) and how the fit went."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"  # "steps" | "time_budget"
    cached: bool = False  # the frozen layers ran once per sequence (frozen.py)
    packed: bool = False  # each step's rows ran as one prefix tree (packing.py)


def _init(
    model: HyperLoRAModel, config: ConsolidationConfig, init: Adapter | None, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Full-depth A/B in fp32 and the first trained layer.

    From ``init`` (e.g. the instant hypernetwork adapter, scaling folded into B) or the usual LoRA
    start: A small and random, B zero, so step 0 is the bare model.
    """
    L = model.injector.num_layers
    first = max(0, L - (config.layers or L))  # a model with fewer layers trains them all
    A, B = {}, {}
    if init is not None:
        fa, fb = init.folded()
        for name in config.target_modules:
            if name not in fa:
                raise InvalidInputError(f"the starting adapter has no {name!r}; it targets {sorted(fa)}")
            A[name], B[name] = fa[name].detach().float().clone(), fb[name].detach().float().clone()
        return A, B, first
    for name in config.target_modules:
        if name not in model.injector.shapes:
            raise InvalidInputError(
                f"target module {name!r} is not in this model; it has {sorted(model.injector.shapes)}"
            )
        d_in, d_out = model.injector.shapes[name]
        bound = 1.0 / math.sqrt(d_in)
        A[name] = (torch.rand(L, config.rank, d_in, generator=generator) * 2 - 1) * bound
        B[name] = torch.zeros(L, d_out, config.rank)
    return A, B, first


def _per_layer(A_low, B_low, A_train, B_train, scaling: float):
    """Per-layer A/B lists for the hooks: frozen layers below (``None`` where their B is zero,
    so they cost nothing), trained ones above. Separate tensors keep autograd out of the frozen
    layers: a step then backpropagates through the top layers only."""
    A, B = {}, {}
    for k in A_train:
        low = [None if not b.any() else (a, b * scaling) for a, b in zip(A_low[k], B_low[k], strict=True)]
        top = list(zip(A_train[k], B_train[k] * scaling, strict=True))
        A[k] = [p[0] if p else None for p in low + top]
        B[k] = [p[1] if p else None for p in low + top]
    return A, B


# rows -> (logits [n, vocab], per row the indices of the logits predicting its target tokens)
Logits = Callable[[Sequence[tuple[list[int], list[int]]]], tuple[torch.Tensor, list[torch.Tensor]]]


def optimise(
    model: HyperLoRAModel,
    config: ConsolidationConfig,
    sequences: Sequences,
    draw: Callable[[int, torch.Generator], list],
    loss_of: Callable[[list, Logits], torch.Tensor],
    *,
    init: Adapter | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """The loop every consolidation objective shares; the objective supplies two functions.

    ``draw(step, generator)`` picks a step's rows; ``loss_of(rows, logits)`` returns their loss,
    where ``logits(seqs)`` runs the model with the adapter being trained on (prompt, target)
    pairs -- as one prefix tree where the model computes that exactly (packing.py), the frozen
    layers from cache when ``sequences`` (every pair a row can have) allow it -- and returns the
    logits predicting each target token. Deterministic for a seed (same threads, same machine).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    A_full, B_full, first = _init(model, config, init, generator)
    device = model.base.device
    # Only the top layers train; below them the starting weights stay as they are (frozen).
    A_train = {k: v[first:].clone().to(device).requires_grad_(True) for k, v in A_full.items()}
    B_train = {k: v[first:].clone().to(device).requires_grad_(True) for k, v in B_full.items()}
    A_low = {k: v[:first].to(device) for k, v in A_full.items()}
    B_low = {k: v[:first].to(device) for k, v in B_full.items()}
    params = [*A_train.values(), *B_train.values()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    pad_id = pad_token_id(model)
    scaling = config.scaling if init is None else 1.0  # an init adapter's scaling is folded already
    result = FitResult(A={}, B={})
    with torch.no_grad(), model.injector.activate_weights(*_per_layer(A_low, B_low, A_train, B_train, scaling)):
        frozen = FrozenPrefix.build(model, sequences, first, pad_id)
        use_tree = config.packing and _tree_is_exact(model, sequences, pad_id, frozen)
    result.cached, result.packed = frozen is not None, use_tree

    def logits(seqs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        packed = packing.tree(seqs, device, model.base.dtype) if use_tree else None
        packed = packed or packing.padded(seqs, pad_id, device)
        return _forward(model, frozen, seqs, packed), packed.at

    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise ConsolidationInterrupted(f"stopped after {step} of {config.steps} steps")
        rows = draw(step, generator)
        A, B = _per_layer(A_low, B_low, A_train, B_train, scaling)
        with torch.enable_grad(), model.injector.activate_weights(A, B):
            loss = loss_of(rows, logits)
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


def _forward(model: HyperLoRAModel, frozen: FrozenPrefix | None, seqs, packed: packing.Packed) -> torch.Tensor:
    """Logits at ``packed.keep``, flattened over the batch. Only there: the vocabulary projection
    is a fifth of the model."""
    if frozen is not None:  # the frozen layers' output is cached: run the top ones only
        out = frozen.logits(frozen.hidden(seqs, packed.origin), packed)
    else:
        out = model.model(
            input_ids=packed.ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            logits_to_keep=packed.keep,
        ).logits
    return out.reshape(-1, out.shape[-1])


def _tree_is_exact(model: HyperLoRAModel, sequences: Sequences, pad_id: int, frozen: FrozenPrefix | None) -> bool:
    """Whether this model computes a prefix tree's logits as it does each row's own (checked on
    the first two distinct sequences, which share at least the chat prefix). An attention kernel
    that ignores a 4-D mask, or an architecture that needs other arguments, fails here and is
    trained on padded batches instead, which are always right."""
    distinct = list(dict.fromkeys((tuple(p), tuple(t)) for p, t in sequences))[:2]
    seqs = [(list(p), list(t)) for p, t in distinct]
    device = model.base.device
    try:
        with torch.no_grad():
            packed = packing.tree(seqs, device, model.base.dtype)
            if packed is None:
                return False
            flat = packing.padded(seqs, pad_id, device)
            a = _forward(model, frozen, seqs, packed)[torch.cat(packed.at)]
            b = _forward(model, frozen, seqs, flat)[torch.cat(flat.at)]
    except Exception:  # noqa: BLE001 - any failure means: do not use trees on this model
        return False
    # Two batchings of the same rows differ by rounding: in fp32 by ~1e-5, in bf16 by ~2 % of the
    # largest logit (0.6 of 34 for SmolLM2 on CPU). A mask that lets a row see another row's
    # tokens moves logits by their own size (31 of 34), so a few epsilons of the scale separate them.
    a, b = a.float(), b.float()
    scale = float(b.abs().max())
    tolerance = max(1e-3, 4 * torch.finfo(model.base.dtype).eps * scale) + 1e-3 * scale
    return float((a - b).abs().max()) <= tolerance


def pad_token_id(model: HyperLoRAModel) -> int:
    return model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0


def fit(
    model: HyperLoRAModel,
    sequences: Sequences,
    config: ConsolidationConfig,
    *,
    init: Adapter | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train A/B so the model, with them active, predicts each target after its prompt.

    ``sequences`` are drawn ``batch_size`` at a time in the given order, cycling: the caller's
    schedule decides the mix.
    """
    if not sequences:
        raise InvalidInputError("nothing to consolidate: no training sequences")
    n, device = len(sequences), model.base.device

    def draw(step: int, _generator: torch.Generator) -> list:
        return [sequences[(step * config.batch_size + i) % n] for i in range(config.batch_size)]

    def loss_of(rows: list, logits: Logits) -> torch.Tensor:
        out, at = logits(rows)
        labels = torch.tensor([token for _, target in rows for token in target], device=device)
        return torch.nn.functional.cross_entropy(out[torch.cat(at)].float(), labels)

    return optimise(
        model,
        config,
        sequences,
        draw,
        loss_of,
        init=init,
        seed=seed,
        time_budget_s=time_budget_s,
        progress=progress,
        should_stop=should_stop,
    )
