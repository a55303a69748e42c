"""Adapters in PEFT's on-disk format, so ``PeftModel.from_pretrained(base, path)`` loads them.

Our metadata travels in ``hyperlora_metadata.json`` beside PEFT's two files; PEFT ignores it.
Loading accepts safetensors only, and refuses wrong shapes and other base models by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from ..errors import BaseModelMismatchError, CheckpointError, UnsafeFileError
from .adapter import Adapter, AdapterMetadata, read_checked
from .layer import LoRAInjector

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
METADATA_NAME = "hyperlora_metadata.json"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
_KEY_RE = re.compile(r"layers\.(\d+)\.(?:.+\.)?([A-Za-z0-9_]+)\.lora_([AB])\.weight$")


def save_peft(adapter: Adapter, path: str | Path, injector: LoRAInjector, base_model_name_or_path: str) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory for the model ``injector`` is attached to."""
    injector.check(adapter)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    A, B = adapter.A, adapter.B
    state: dict[str, torch.Tensor] = {}
    for name in A:
        for layer in range(injector.num_layers):
            prefix = f"base_model.model.{injector.targets[(name, layer)].path}"
            state[f"{prefix}.lora_A.weight"] = A[name][layer].detach().contiguous().cpu()
            state[f"{prefix}.lora_B.weight"] = B[name][layer].detach().contiguous().cpu()
    rank = adapter.rank
    config = LoraConfig(
        r=rank,
        lora_alpha=adapter.scaling * rank,  # PEFT's scale is alpha / r
        target_modules=list(adapter.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(path))
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / METADATA_NAME).write_text(adapter.metadata.model_dump_json(indent=2))
    return path


def load_peft(
    path: str | Path,
    injector: LoRAInjector | None = None,
    *,
    base_name: str | None = None,
    max_bytes: int = 2**31,
) -> Adapter:
    """Read a PEFT LoRA directory into an ``Adapter``.

    ``injector`` (when given) checks shapes against the model; ``base_name`` is compared with the
    base model the adapter config names.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not an adapter directory")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if any((path / name).exists() for name in _PICKLE_NAMES):
            raise UnsafeFileError(f"{path} holds only a pickled adapter; convert it to safetensors first")
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME} is missing or not JSON: {exc}") from exc
    if base_name is not None:
        from ..base_model import model_name

        declared = config.get("base_model_name_or_path")
        if declared and model_name(declared).lower() != model_name(base_name).lower():
            raise BaseModelMismatchError(f"adapter at {path} was made for {declared!r}, not {base_name!r}")
    tensors = st_load(read_checked(weights, max_bytes=max_bytes))
    per_module: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        match = _KEY_RE.search(key)
        if not match:
            continue
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        per_module.setdefault(module, {}).setdefault(layer, {})[which] = value
    if not per_module:
        raise CheckpointError(f"{weights} holds no LoRA weights")
    num_layers = injector.num_layers if injector else 1 + max(max(d) for d in per_module.values())
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for module, layers in per_module.items():
        rank = next(iter(layers.values()))["A"].shape[0]
        if injector is not None and module not in injector.shapes:
            raise BaseModelMismatchError(f"adapter targets {module!r}, which this model does not have")
        any_layer = next(iter(layers.values()))
        d_in, d_out = any_layer["A"].shape[1], any_layer["B"].shape[0]
        a = torch.zeros(num_layers, rank, d_in)
        b = torch.zeros(num_layers, d_out, rank)
        for layer, pair in layers.items():
            if layer >= num_layers or set(pair) != {"A", "B"}:
                raise CheckpointError(f"layer {layer} of {module!r} is incomplete or beyond the model")
            if pair["A"].shape != (rank, d_in) or pair["B"].shape != (d_out, rank):
                raise CheckpointError(f"layer {layer} of {module!r} has inconsistent LoRA shapes")
            a[layer], b[layer] = pair["A"], pair["B"]
        A[module], B[module] = a, b
    rank = next(iter(A.values())).shape[1]
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    meta_file = path / METADATA_NAME
    metadata = (
        AdapterMetadata.model_validate_json(meta_file.read_text())
        if meta_file.is_file()
        else AdapterMetadata(kind="peft", source=str(path), base_model=config.get("base_model_name_or_path") or "")
    )
    adapter = Adapter(A, B, scaling=scaling, metadata=metadata)
    if injector is not None:
        injector.check(adapter)
    return adapter
