"""Adapters in PEFT's on-disk format, so ``PeftModel.from_pretrained(base, path)`` loads them.

Our metadata travels in ``hyperlora_metadata.json`` beside PEFT's two files; PEFT ignores it.
Loading accepts safetensors only, and refuses wrong shapes and other base models by name.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from ..errors import BaseModelMismatchError, CheckpointError, UnsafeFileError
from .adapter import Adapter, AdapterMetadata, load_safetensors, read_checked, read_regular_file
from .layer import LoRAInjector

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
METADATA_NAME = "hyperlora_metadata.json"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
_KEY_RE = re.compile(r"layers\.(\d+)\.(?:.+\.)?([A-Za-z0-9_]+)\.lora_([AB])\.weight$")
_MAX_CONFIG_BYTES = 2**20  # adapter_config.json / hyperlora_metadata.json: a few hundred bytes in practice
_MAX_LAYERS = 4096  # a layer index beyond this is a forged file (no model has that many layers)


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
    # safetensors writes its file 0600 whatever the umask; an export is meant to be shared, so
    # give the weights the permissions of the JSON file written beside them (0644 under umask 022).
    os.chmod(path / WEIGHTS_NAME, stat.S_IMODE(os.stat(path / CONFIG_NAME).st_mode))
    return path


def _member(directory: Path, name: str) -> Path:
    """``directory / name``, refusing a symlink that leads out of the adapter directory.

    A link inside the directory is fine, and so is the Hugging Face cache layout
    (``<repo>/snapshots/<rev>/<file>`` -> ``<repo>/blobs/<hash>``); a link to anywhere else would
    let whoever writes the directory make us read (and report on) an arbitrary file.
    """
    path = directory / name
    if not path.is_symlink():
        return path
    real_dir, target = directory.resolve(), path.resolve()
    if target.is_relative_to(real_dir):
        return path
    for ancestor in (real_dir, *real_dir.parents):
        if ancestor.parent.name == "snapshots" and target.parent == ancestor.parent.parent / "blobs":
            return path
    raise UnsafeFileError(f"{path} is a symlink leading out of the adapter directory; copy the file in instead")


def _read_json(path: Path, what: str) -> object:
    data = read_regular_file(path, max_bytes=_MAX_CONFIG_BYTES, what=what)
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a 4,300-digit int
        raise CheckpointError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not JSON: nested too deeply") from None


def _number(config: dict, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{CONFIG_NAME}: {key} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int of hundreds of digits
        raise CheckpointError(f"{CONFIG_NAME}: {key} is out of range") from None


def _stack(module: str, layers: dict[int, dict[str, torch.Tensor]], num_layers: int, budget: int) -> tuple:
    """One module's per-layer A (r, d_in) and B (d_out, r) stacked to (L, r, d_in) / (L, d_out, r)."""
    for layer, pair in layers.items():
        if layer >= num_layers or set(pair) != {"A", "B"}:
            raise CheckpointError(f"layer {layer} of {module!r} is incomplete or beyond the model")
        if pair["A"].dim() != 2 or pair["B"].dim() != 2:
            raise CheckpointError(f"layer {layer} of {module!r}: lora_A and lora_B must be matrices")
    first = layers[min(layers)]
    rank, d_in, d_out = first["A"].shape[0], first["A"].shape[1], first["B"].shape[0]
    if num_layers * rank * (d_in + d_out) * 4 > budget:
        raise CheckpointError(f"{module!r}: {num_layers} layers of rank {rank} would exceed the size limit")
    a = torch.zeros(num_layers, rank, d_in)
    b = torch.zeros(num_layers, d_out, rank)
    for layer, pair in layers.items():
        if pair["A"].shape != (rank, d_in) or pair["B"].shape != (d_out, rank):
            raise CheckpointError(f"layer {layer} of {module!r} has inconsistent LoRA shapes")
        if not (pair["A"].is_floating_point() and pair["B"].is_floating_point()):
            raise CheckpointError(f"layer {layer} of {module!r}: LoRA weights must be floating point")
        a[layer], b[layer] = pair["A"], pair["B"]
    return a, b


def load_peft(
    path: str | Path,
    injector: LoRAInjector | None = None,
    *,
    base_name: str | None = None,
    max_bytes: int = 2**31,
) -> Adapter:
    """Read a PEFT LoRA directory into an ``Adapter``.

    ``injector`` (when given) checks shapes against the model; ``base_name`` is compared with the
    base model the adapter config names. Every file is read with ``read_regular_file`` (a FIFO or
    device is refused, never waited on), symlinks out of the directory are refused, and anything
    malformed is a ``CheckpointError``: see docs/reliability.md.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not an adapter directory")
    weights = _member(path, WEIGHTS_NAME)
    if not weights.exists() and not weights.is_symlink():
        if any((path / name).exists() for name in _PICKLE_NAMES):
            raise UnsafeFileError(f"{path} holds only a pickled adapter; convert it to safetensors first")
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    config = _read_json(_member(path, CONFIG_NAME), CONFIG_NAME)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG_NAME} must hold a JSON object")
    declared = config.get("base_model_name_or_path")
    if declared is not None and not isinstance(declared, str):
        raise CheckpointError(f"{CONFIG_NAME}: base_model_name_or_path must be a string")
    if base_name is not None and declared:
        from ..base_model import model_name

        if model_name(declared).lower() != model_name(base_name).lower():
            raise BaseModelMismatchError(f"adapter at {path} was made for {declared!r}, not {base_name!r}")
    tensors = load_safetensors(read_checked(weights, max_bytes=max_bytes))
    per_module: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        match = _KEY_RE.search(key)
        if not match:
            continue
        if len(match.group(1)) > 6 or int(match.group(1)) >= _MAX_LAYERS:
            raise CheckpointError(f"{key}: layer index beyond any model")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        per_module.setdefault(module, {}).setdefault(layer, {})[which] = value
    if not per_module:
        raise CheckpointError(f"{weights} holds no LoRA weights")
    num_layers = injector.num_layers if injector else 1 + max(max(d) for d in per_module.values())
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for module, layers in per_module.items():
        if injector is not None and module not in injector.shapes:
            raise BaseModelMismatchError(f"adapter targets {module!r}, which this model does not have")
        A[module], B[module] = _stack(module, layers, num_layers, max_bytes)
    rank = next(iter(A.values())).shape[1]
    if rank == 0:
        raise CheckpointError(f"{weights} holds rank-0 LoRA weights")
    alpha = _number(config, "lora_alpha", rank)
    scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    meta_file = _member(path, METADATA_NAME)
    try:
        metadata = (
            AdapterMetadata.model_validate_json(read_regular_file(meta_file, max_bytes=_MAX_CONFIG_BYTES))
            if meta_file.exists() or meta_file.is_symlink()
            else AdapterMetadata(kind="peft", source=str(path), base_model=declared or "")
        )
        adapter = Adapter(A, B, scaling=scaling, metadata=metadata)
    except ValueError as exc:  # pydantic's ValidationError, InvalidInputError (NaN/huge scaling)
        raise CheckpointError(f"invalid PEFT adapter at {path}: {exc}") from None
    if injector is not None:
        injector.check(adapter)
    return adapter
