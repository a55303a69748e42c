"""Model loading shared by the examples: the default model, or the tiny test model.

``--tiny`` builds a 2-layer random Llama with the real tokenizer and random (untrained) hypernets
whose adapters are non-zero: every code path runs in seconds, and every answer is meaningless
(often empty: the random model mostly emits whitespace, which prints as '').
"""

from __future__ import annotations

import argparse

import torch

from hyperlora_integrations import HyperLoRAModel


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model (seconds; answers are meaningless, often empty)"
    )
    parser.add_argument("--d2l", default="default", help="Doc-to-LoRA checkpoint dir ('default': the shipped one)")
    parser.add_argument("--t2l", default="default", help="Text-to-LoRA checkpoint dir ('default': the shipped one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def tiny_model(seed: int = 0) -> HyperLoRAModel:
    """The test suite's tiny model: random base, random hypernets given non-zero output scales."""
    from hyperlora_integrations.testing import tiny_hyperlora_model

    return tiny_hyperlora_model(seed)


def load_model(args: argparse.Namespace, *, need: tuple[str, ...]) -> HyperLoRAModel:
    """The model the example runs on; exits with a clear message if a needed hypernet is missing."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        return tiny_model()
    model = HyperLoRAModel.from_pretrained(d2l=args.d2l, t2l=args.t2l)
    missing = [kind for kind in need if getattr(model, kind) is None]
    if missing:
        raise SystemExit(
            f"no {' / '.join(missing)} checkpoint is loaded for {model.name}: checkpoints ship for the default "
            "model only; pass --d2l/--t2l with a trained checkpoint "
            "directory, or run with --tiny"
        )
    return model
