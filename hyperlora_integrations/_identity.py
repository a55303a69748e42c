"""Which base model a loaded model is: its architecture fingerprint, and whether it is the default.

Adapters and hypernetworks fit only a model with the shapes they were made for, so each records
the ``fingerprint``; the shipped hypernetworks are loaded only for the default model
(``is_default_model``), and an exported adapter names the default by its hub id, not by this
machine's cache path. ``model.py`` re-exports these names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base_model import DEFAULT_MODEL_NAME

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hugging Face id of the default model, recorded in exported adapters."""


def fingerprint(model: torch.nn.Module) -> str:
    """Architecture identity: adapters and hypernets only fit models with the same shapes."""
    c = model.config
    return (
        f"{c.model_type}:L{c.num_hidden_layers}:H{c.hidden_size}:I{getattr(c, 'intermediate_size', 0)}:V{c.vocab_size}"
    )


def _names_default(base_model: str | os.PathLike | None) -> bool:
    """``"SmolLM2-135M-Instruct"`` or its hub id, unless a local folder of that name exists."""
    return (
        base_model is not None
        and str(base_model) in (DEFAULT_MODEL_NAME, DEFAULT_HUB_ID)
        and not Path(base_model).exists()
    )


def _shipped_fingerprint() -> str | None:
    """The base-model fingerprint the shipped checkpoints were trained for (None if absent)."""
    import json

    from .hypernets.checkpoint import CONFIG_NAME, SHIPPED

    try:
        return json.loads((SHIPPED["d2l"] / CONFIG_NAME).read_text()).get("base_fingerprint")
    except (OSError, ValueError):
        return None


def is_default_model(model: torch.nn.Module, name: str) -> bool:
    """Whether a loaded model is the default one: its name and its architecture fingerprint.

    The cached fp32 folder (``.../SmolLM2-135M-Instruct-fp32``), the embedded default and the hub
    copy all qualify; a same-shaped model of another name (SmolLM2-135M base) does not.
    """
    return name == DEFAULT_MODEL_NAME and fingerprint(model) == _shipped_fingerprint()
