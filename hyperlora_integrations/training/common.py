"""What both training loops share: the learning-rate schedule and the base model to train on."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..hypernets import checkpoint as ckpt
from ..model import HyperLoRAModel
from .state import save_state


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``args.lr`` at ``args.steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def add_contrast_args(p, unit: str) -> None:
    """``--contrast`` / ``--contrast-margin``: matched adapter against another ``unit``'s, and
    ``--init`` (a contrastive run usually starts from a trained checkpoint)."""
    p.add_argument(
        "--contrast",
        type=float,
        default=0.0,
        help=f"weight of the contrastive term: the {unit}'s own adapter must beat another {unit}'s (0: off)",
    )
    p.add_argument(
        "--contrast-margin", type=float, default=0.1, help="nats per token the matched adapter should win by"
    )
    p.add_argument("--init", default=None, help="start the hypernetwork from this checkpoint directory")


def training_model(tiny: bool, base_model: str | None, device: str = "cpu") -> HyperLoRAModel:
    """The frozen model a hypernetwork trains through (``tiny``: the test model)."""
    if tiny:
        from ..testing import tiny_base_model

        base = tiny_base_model()
        base.model.to(device)
        return HyperLoRAModel(base)
    from ..base_model import load_base_model

    if device.startswith("cuda"):
        # TF32 matmuls for training only (weights and LoRA stay fp32): the gradient is noisy
        # anyway. Evaluation loads without this and stays full fp32 (`hyperlora eval d2l` on an
        # H100 reproduced the CPU's no-document and in-context NLL to 1e-5).
        torch.set_float32_matmul_precision("high")
    return HyperLoRAModel(load_base_model(base_model, device=device))


def add_run_args(p) -> None:
    """Where a training run computes and how long it may take (both loops share them)."""
    p.add_argument("--device", default="cpu", help="torch device of the base model and hypernetwork (cpu, cuda)")
    p.add_argument(
        "--max-minutes", type=float, default=0, help="save and stop after this much wall time (0: run all steps)"
    )


def save_or_stop(step: int, args, started: float, out: Path, net, opt, info: dict, bar) -> bool:
    """Checkpoint every ``--save-every`` steps and at the end; True (after saving) once out of time.

    A run that used its ``--max-minutes`` saves a resumable state before it stops, so the same
    command continues where it left off.
    """
    stop = args.max_minutes > 0 and time.time() - started > 60 * args.max_minutes
    if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
        save_state(out / "state.safetensors", net, opt, info)
        ckpt.save(net, out / "checkpoint")
    if stop:
        bar.write(f"stopping after {args.max_minutes} minutes at step {step + 1}; the same command resumes")
    return stop
