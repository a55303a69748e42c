"""Hypernetwork checkpoints: ``config.json`` + ``model.safetensors``, never pickle.

Weights may be stored in half precision (the shipped ones are, to stay small in the repo) and
are upcast on load. Shapes are checked against the config before any weight is copied.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save as st_save

from ..errors import CheckpointError
from ..lora.adapter import load_safetensors, read_checked, read_regular_file, read_safetensors_header
from .base import Hypernetwork
from .config import D2LConfig, T2LConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = {"d2l": SHIPPED_DIR / "d2l-smollm2-135m", "t2l": SHIPPED_DIR / "t2l-smollm2-135m"}


def _classes():
    from .d2l import DocToLoRA
    from .sakana_d2l import SakanaD2LConfig, SakanaDocToLoRA
    from .sakana_t2l import SakanaT2LConfig, SakanaTextToLoRA
    from .t2l import TextToLoRA

    return {
        "d2l": (D2LConfig, DocToLoRA),
        "t2l": (T2LConfig, TextToLoRA),
        # imported from Sakana's releases (``hyperlora import``); their 7B-model D2L is ~2.5 GB in float32
        "sakana-d2l": (SakanaD2LConfig, SakanaDocToLoRA),
        "sakana-t2l": (SakanaT2LConfig, SakanaTextToLoRA),
    }


IMPORTED_MAX_BYTES = 2**34


def save(
    net: Hypernetwork, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16, extra: dict | None = None
) -> Path:
    """Write ``net`` atomically (temp files, then rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in net.state_dict().items()}
    blob = st_save(state, metadata={"format": "hyperlora-hypernet", "kind": net.config.kind, **(extra or {})})
    for name, data in ((WEIGHTS_NAME, blob), (CONFIG_NAME, net.config.model_dump_json(indent=2).encode())):
        tmp = path / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path / name)
    return path


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", max_bytes: int = 2**31) -> Hypernetwork:
    path = Path(path)
    try:
        raw = json.loads(read_regular_file(path / CONFIG_NAME, max_bytes=2**20, what="hypernetwork config"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME} is not JSON: {exc}") from None
    kinds = _classes()
    if not isinstance(raw, dict) or raw.get("kind") not in kinds:
        raise CheckpointError(
            f"{path} is not a hypernetwork checkpoint (kind={raw.get('kind') if isinstance(raw, dict) else None!r})"
        )
    config_cls, net_cls = kinds[raw["kind"]]
    try:
        config = config_cls.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"invalid config in {path}: {exc}") from exc
    if raw["kind"].startswith("sakana-"):
        max_bytes = max(max_bytes, IMPORTED_MAX_BYTES)
    data = read_checked(path / WEIGHTS_NAME, max_bytes=max_bytes)
    stored = {k: tuple(v["shape"]) for k, v in read_safetensors_header(data).items() if k != "__metadata__"}
    # Compare the config's shapes with the file's on the meta device first (no memory): a 393-byte
    # config with huge widths otherwise allocated terabytes before the weights were looked at.
    # Afterwards the real net is no larger than the weights file (x2 for float16 weights).
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in net_cls(config).state_dict().items()}
    except (AssertionError, RuntimeError, ValueError, OverflowError) as exc:  # e.g. heads not dividing the width
        raise CheckpointError(f"invalid config in {path}: cannot build the network ({exc})") from None
    missing = set(expected) - set(stored)
    unexpected = set(stored) - set(expected)
    wrong = [k for k in expected.keys() & stored.keys() if expected[k] != stored[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match its config: missing={sorted(missing)[:3]} "
            f"unexpected={sorted(unexpected)[:3]} wrong shapes={wrong[:3]}"
        )
    state = load_safetensors(data)
    net = net_cls(config)
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return net.to(device).eval().requires_grad_(False)


def resolve(kind: str, spec: str | os.PathLike | None, *, shipped: bool, device: str = "cpu") -> Hypernetwork | None:
    """``"default"`` -> the shipped checkpoint (default base model only), a path -> that, None -> none."""
    if spec is None:
        return None
    if str(spec) == "default":
        if not shipped:
            return None
        if not (SHIPPED[kind] / WEIGHTS_NAME).is_file():
            warnings.warn(f"no shipped {kind} checkpoint found at {SHIPPED[kind]}", stacklevel=3)
            return None
        spec = SHIPPED[kind]
    net = load(spec, device=device)
    if getattr(net, "role", net.config.kind) != kind:
        raise CheckpointError(f"{spec} holds a {net.config.kind} checkpoint, not {kind}")
    return net
