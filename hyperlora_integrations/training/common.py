"""What both training loops share: the learning-rate schedule and the base model to train on."""

from __future__ import annotations

import math
import time

from ..model import HyperLoRAModel


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``args.lr`` at ``args.steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_model(tiny: bool, base_model: str | None, device: str = "cpu") -> HyperLoRAModel:
    """The frozen model a hypernetwork trains through (``tiny``: the test model)."""
    if tiny:
        from ..testing import tiny_base_model

        base = tiny_base_model()
        base.model.to(device)
        return HyperLoRAModel(base)
    from ..base_model import load_base_model

    return HyperLoRAModel(load_base_model(base_model, device=device))


def out_of_time(started: float, max_minutes: float) -> bool:
    """True once a run has used its wall-clock allowance (0: none), so it can save and stop cleanly."""
    return max_minutes > 0 and time.time() - started > 60 * max_minutes
