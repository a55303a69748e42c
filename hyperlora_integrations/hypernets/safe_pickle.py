"""Read Sakana's pickled checkpoints without running their code (or anyone's).

Their Doc-to-LoRA checkpoints are ``torch.save`` pickles of a dict that holds tensors *and*
their config dataclasses (``HypernetConfig``, ``AggregatorConfig``, peft's ``LoraConfig``, ...),
and their own loader opens them with ``torch.load(..., weights_only=False)``: whoever wrote the
file chooses what runs. We use torch's ``weights_only`` unpickler, which builds only containers,
numbers, strings and tensors and refuses every other global, and name each of their config
classes on an allow-list that maps it to a *stand-in* defined here: a plain record (dataclasses)
or a plain value (enums). Their modules are never imported and none of their callables is ever
called; a pickle naming anything else (``os.system`` in a ``__reduce__``, an unknown class) is
refused before any object is built, with ``UnsafeFileError``.
"""

from __future__ import annotations

import os
import pickle
import stat
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsafeFileError


class PickledRecord:
    """Stand-in for an allow-listed dataclass: its pickled field values, as plain data.

    Unpickling calls only ``__new__`` (NEWOBJ) and ``__setstate__`` (BUILD) on it, both defined
    here. Fields read with ``record["name"]`` or ``record.get("name")``.
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A REDUCE that calls the class with arguments: keep nothing, the class is data only.
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"state of {self.qualname} is not a dict")
        self.fields = {str(k): v for k, v in state.items()}

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, "fields", {}).get(key, default)

    def __repr__(self) -> str:
        return f"<{self.qualname} {sorted(getattr(self, 'fields', {}))}>"


class PickledEnum:
    """Stand-in for an allow-listed enum: pickles rebuild enum members as ``Cls(value)``."""

    qualname = "?"

    def __init__(self, value: Any) -> None:
        if not isinstance(value, (str, int)):
            raise pickle.UnpicklingError(f"{self.qualname} value must be str or int, got {type(value).__name__}")
        self.value = value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PickledEnum):
            return self.value == other.value
        return self.value == other

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"<{self.qualname} {self.value!r}>"


# Their config classes, by the path pickle records. Anything else is refused.
D2L_RECORDS = (
    "ctx_to_lora.modeling.hypernet.HypernetConfig",
    "ctx_to_lora.modeling.aggregator.AggregatorConfig",
    "ctx_to_lora.configs.CtxEncoderArguments",
    "ctx_to_lora.configs.HypernetArguments",
    "ctx_to_lora.configs.AggregatorArguments",
    "ctx_to_lora.modeling.idefics2.Idefics2PerceiverConfig",
    "peft.tuners.lora.config.LoraConfig",
    "peft.tuners.lora.config.LoraRuntimeConfig",
    "peft.tuners.lora.config.LoftQConfig",
    "peft.tuners.lora.config.EvaConfig",
    "peft.tuners.lora.config.CordaConfig",
)
D2L_ENUMS = (
    "ctx_to_lora.modeling.aggregator.AGGREGATOR_TYPE",
    "ctx_to_lora.modeling.ctx_encoder.CTX_ENCODER_TYPE",
    "ctx_to_lora.pooling.POOL_FN",
    "peft.utils.peft_types.PeftType",
    "peft.utils.peft_types.TaskType",
)


def _stand_ins(records: tuple[str, ...], enums: tuple[str, ...]) -> list[tuple[type, str]]:
    out: list[tuple[type, str]] = []
    for path in records:
        out.append((type(path.rsplit(".", 1)[-1], (PickledRecord,), {"qualname": path}), path))
    for path in enums:
        out.append((type(path.rsplit(".", 1)[-1], (PickledEnum,), {"qualname": path}), path))
    # protocol-2 pickles rebuild a set as REDUCE(builtins.set, [items])
    out.append((set, "builtins.set"))
    out.append((frozenset, "builtins.frozenset"))
    return out


def load_checkpoint(
    path: str | os.PathLike,
    *,
    records: tuple[str, ...] = D2L_RECORDS,
    enums: tuple[str, ...] = D2L_ENUMS,
    max_bytes: int = 64 * 2**30,
) -> Any:
    """``torch.load`` of ``path`` that can only build data; every refusal is ``UnsafeFileError``.

    ``records``/``enums`` are the class paths allowed, as stand-ins (``PickledRecord`` /
    ``PickledEnum``). Tensors land on the CPU.
    """
    import torch

    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise CheckpointError(f"{path} is not a regular file")
    size = st.st_size
    if size > max_bytes:
        raise CheckpointError(f"{path} is {size} bytes, over the {max_bytes}-byte limit")
    if not zipfile.is_zipfile(path):
        # Legacy (pre-1.6) torch.save files interleave pickles with raw storages; torch reads them
        # with the same restricted unpickler, but nothing Sakana released is in that format.
        raise UnsafeFileError(f"{path} is not a torch zip checkpoint; refusing to unpickle it")
    try:
        with torch.serialization.safe_globals(_stand_ins(records, enums)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise UnsafeFileError(
            f"refused to unpickle {path}: {why} Only tensors, plain containers and Sakana's known "
            "config classes (as data) are allowed; a checkpoint that needs more is not one we can load safely."
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def as_plain(value: Any) -> Any:
    """Records to dicts, enums to their values, sets to sorted lists (for JSON and comparisons)."""
    import torch

    if isinstance(value, PickledRecord):
        return {k: as_plain(v) for k, v in value.fields.items()}
    if isinstance(value, PickledEnum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(as_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
