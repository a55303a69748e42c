"""What both training loops share: the learning-rate schedule and the base model to train on."""

from __future__ import annotations

import math

from ..model import HyperLoRAModel


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``args.lr`` at ``args.steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_model(tiny: bool, base_model: str | None) -> HyperLoRAModel:
    """The frozen model a hypernetwork trains through (``tiny``: the test model)."""
    if tiny:
        from ..testing import tiny_base_model

        return HyperLoRAModel(tiny_base_model())
    from ..base_model import load_base_model

    return HyperLoRAModel(load_base_model(base_model))
