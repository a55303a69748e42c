"""The ``Adapter``: LoRA weights for every layer of some target modules, plus where they came from.

Weights are stored stacked over layers, ``A[module]`` of shape ``(L, r, d_in)`` and
``B[module]`` of shape ``(L, d_out, r)``: hypernetworks emit all layers in one pass, and the
stacked form makes rank concatenation one ``torch.cat`` per module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import BaseModelMismatchError, CheckpointError, InvalidInputError

FORMAT_VERSION = "1"
# Real LoRA scalings (alpha / r, alpha / sqrt(r)) are O(0.1..100); beyond this it is corruption or an attack.
MAX_SCALING = 1e6


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AdapterMetadata(BaseModel):
    """What an adapter is and which base model it was made for."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: str = "custom"  # "document" | "skill" | "custom" | "distilled" | ...
    source: str = ""  # where the content came from (file name, URL, "generate_skill", ...)
    description: str = ""  # a skill's description, or a document's title/excerpt
    base_model: str = ""
    base_fingerprint: str = ""
    created_at: str = Field(default_factory=_now)
    content_hash: str = ""  # sha256 of the source text: the same document is not internalized twice

    @classmethod
    def for_document(cls, text: str, *, base_model: str, base_fingerprint: str, source: str = "", **extra):
        """A document adapter's metadata: one definition for internalize, consolidate and imports."""
        return cls(
            kind="document",
            source=source,
            description=" ".join(text[:200].split()),
            base_model=base_model,
            base_fingerprint=base_fingerprint,
            content_hash=content_hash(text),
            **extra,
        )

    @classmethod
    def for_skill(cls, description: str, *, base_model: str, base_fingerprint: str, source: str, **extra):
        """A skill adapter's metadata: one definition for generated, imported and consolidated skills."""
        return cls(
            kind="skill",
            source=source,
            description=description,
            base_model=base_model,
            base_fingerprint=base_fingerprint,
            content_hash=content_hash(description),
            **extra,
        )


class Adapter:
    """LoRA A/B per target module and layer, a scaling, and metadata.

    Different adapters may have different ranks; several combine by rank concatenation.
    """

    def __init__(
        self,
        A: Mapping[str, torch.Tensor],
        B: Mapping[str, torch.Tensor],
        *,
        scaling: float = 1.0,
        metadata: AdapterMetadata | None = None,
    ) -> None:
        if set(A) != set(B) or not A:
            raise InvalidInputError("an adapter needs the same non-empty set of modules in A and B")
        for name in A:
            a, b = A[name], B[name]
            if a.dim() != 3 or b.dim() != 3:
                raise InvalidInputError(f"{name}: A must be (L, r, d_in) and B (L, d_out, r)")
            if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
                raise InvalidInputError(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on layers or rank")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise InvalidInputError(f"{name}: adapter weights must be floating point, got {a.dtype}/{b.dtype}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise InvalidInputError(f"{name}: adapter weights contain NaN or inf")
        self.A = dict(A)
        self.B = dict(B)
        self.scaling = scaling
        self.metadata = metadata or AdapterMetadata()

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``; always finite and at most ``MAX_SCALING`` in magnitude."""
        return self._scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        # Validated on every assignment, not only in __init__: a NaN/inf (or absurd) scaling turns
        # every activation it touches into NaN, and it would be stored and verified as if healthy.
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidInputError(f"adapter scaling must be a number, got {value!r}") from None
        if not math.isfinite(value) or abs(value) > MAX_SCALING:
            raise InvalidInputError(
                f"adapter scaling must be finite and at most {MAX_SCALING:g} in size, got {value!r}"
            )
        self._scaling = value

    # ------------------------------------------------------------------ properties
    @property
    def id(self) -> str:
        return self.metadata.id

    @property
    def kind(self) -> str:
        return self.metadata.kind

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.A))

    @property
    def num_layers(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of weight data: what keeping this adapter costs instead of a KV cache."""
        return sum(t.numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))

    def __repr__(self) -> str:
        return (
            f"Adapter(id={self.id[:8]}, kind={self.kind}, modules={list(self.target_modules)}, "
            f"layers={self.num_layers}, rank={self.rank}, {self.nbytes / 2**20:.2f} MiB)"
        )

    # ------------------------------------------------------------------ transforms
    def folded(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A and B with the scaling folded into B, so deltas of several adapters just add."""
        return dict(self.A), {k: v * self.scaling for k, v in self.B.items()}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Adapter:
        return Adapter(
            {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()},
            {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()},
            scaling=self.scaling,
            metadata=self.metadata.model_copy(),
        )

    def detach(self) -> Adapter:
        return Adapter(
            {k: v.detach() for k, v in self.A.items()},
            {k: v.detach() for k, v in self.B.items()},
            scaling=self.scaling,
            metadata=self.metadata,
        )

    def check_base(self, base_name: str, fingerprint: str) -> None:
        """Refuse to apply an adapter made for another base model (shapes would lie)."""
        meta = self.metadata
        if meta.base_fingerprint and fingerprint and meta.base_fingerprint != fingerprint:
            raise BaseModelMismatchError(
                f"adapter {self.id[:8]} was made for {meta.base_model or '?'} "
                f"({meta.base_fingerprint}); this model is {base_name} ({fingerprint})"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_bytes(self) -> bytes:
        """One safetensors blob with the metadata in its header: the store's on-disk unit."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self.A:
            tensors[f"{name}.A"] = self.A[name].detach().contiguous().cpu()
            tensors[f"{name}.B"] = self.B[name].detach().contiguous().cpu()
        header = {
            "format": "hyperlora-adapter",
            "format_version": FORMAT_VERSION,
            "scaling": repr(self.scaling),
            "metadata": self.metadata.model_dump_json(),
        }
        return st_save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        header = read_safetensors_header(data)  # validates __metadata__ as a str -> str mapping
        meta = header.get("__metadata__") or {}
        if meta.get("format") != "hyperlora-adapter":
            raise CheckpointError("not a hyperlora adapter file (missing format marker)")
        tensors = load_safetensors(data)
        A = {k[:-2]: v for k, v in tensors.items() if k.endswith(".A")}
        B = {k[:-2]: v for k, v in tensors.items() if k.endswith(".B")}
        try:
            metadata = AdapterMetadata.model_validate_json(meta.get("metadata", "{}"))
            return cls(A, B, scaling=float(meta.get("scaling", "1.0")), metadata=metadata)
        except (ValueError, InvalidInputError) as exc:
            raise CheckpointError(f"invalid adapter file: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write ``to_bytes()`` to one ``.safetensors`` file (for PEFT's format see ``peft_io``)."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path, *, max_bytes: int = 2**31) -> Adapter:
        return cls.from_bytes(read_checked(path, max_bytes=max_bytes))


def concat(adapters: Iterable[Adapter], metadata: AdapterMetadata | None = None) -> Adapter:
    """Rank concatenation: ``[B1 s1 | B2 s2] @ [A1; A2] == s1 B1 A1 + s2 B2 A2``.

    Modules that only some adapters target get zero-rank contributions from the others, so the
    result targets the union of modules.
    """
    adapters = list(adapters)
    if not adapters:
        raise InvalidInputError("concat needs at least one adapter")
    if len(adapters) == 1 and metadata is None:
        return adapters[0]
    layers = {a.num_layers for a in adapters}
    if len(layers) != 1:
        raise InvalidInputError(f"adapters cover different numbers of layers: {sorted(layers)}")
    A: dict[str, list[torch.Tensor]] = {}
    B: dict[str, list[torch.Tensor]] = {}
    for adapter in adapters:
        fa, fb = adapter.folded()
        for name in fa:
            A.setdefault(name, []).append(fa[name])
            B.setdefault(name, []).append(fb[name])
    meta = metadata or AdapterMetadata(
        kind="combined",
        source="+".join(a.id[:8] for a in adapters),
        base_model=adapters[0].metadata.base_model,
        base_fingerprint=adapters[0].metadata.base_fingerprint,
    )
    return Adapter(
        {k: torch.cat(v, dim=1) for k, v in A.items()},
        {k: torch.cat(v, dim=2) for k, v in B.items()},
        scaling=1.0,
        metadata=meta,
    )


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------- safe file reading
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(data: bytes) -> dict:
    """Parse and validate a safetensors header before any tensor is allocated.

    Rejects pickles (by magic bytes), truncated files, headers larger than the file and offsets
    that point past its end: a forged header must not make us allocate gigabytes. Every field is
    type-checked here (offsets and shape dims are non-negative ints, dtypes known, ``__metadata__``
    a str -> str mapping), so a crafted header can only raise ``CheckpointError``, never a
    ``TypeError``/``OverflowError``/``RecursionError`` from deeper down.

    Error messages never quote the file's bytes or size: a path pointing at some other file must
    not turn the error into a way of reading it.
    """
    # A safetensors file is an 8-byte length and then a JSON object. Check that shape before the
    # pickle magic: a valid header of 640, 896, 1152 or 1408 bytes starts with b"\x80\x02".."\x05"
    # too, and was refused as a pickle. (Nothing is ever unpickled either way.)
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    looks_safetensors = len(data) > 8 and 0 < n <= len(data) - 8 and data[8:9] == b"{"
    if not looks_safetensors and (data[:2] in _PICKLE_MAGIC[:4] or data[:4] == _PICKLE_MAGIC[4]):
        from ..errors import UnsafeFileError

        raise UnsafeFileError("refusing a pickle/zip file: only safetensors is accepted")
    if len(data) < 8:
        raise CheckpointError("truncated safetensors file (no header)")
    if n <= 0 or 8 + n > len(data) or n > 100 * 2**20:
        raise CheckpointError("not a safetensors file, or a truncated one: its header length field is invalid")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of over 4,300 digits
        raise CheckpointError(f"corrupt safetensors header: {exc}") from None
    except RecursionError:  # thousands of nested brackets
        raise CheckpointError("corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header: not a mapping")
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError("corrupt safetensors header: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"corrupt safetensors entry {key!r}: not a mapping")
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"corrupt safetensors entry {key!r}: data_offsets must be two ints")
        if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"corrupt safetensors entry {key!r}: shape must be a list of non-negative ints")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"corrupt safetensors entry {key!r}: unsupported dtype")
        count = math.prod(shape)
        start, end = offsets
        if not (0 <= start <= end <= body) or end - start != count * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"safetensors entry {key!r} points outside the file or lies about its size")
    return header


def read_regular_file(path: str | Path, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``; never blocks.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor (no TOCTOU): a
    FIFO, a device such as ``/dev/zero`` or a directory is refused at once instead of hanging or
    reading without end, and at most ``max_bytes + 1`` bytes are read even if the file grows.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{what} {path} is not a regular file (a FIFO, device or directory?)")
        if st.st_size > max_bytes:
            raise CheckpointError(f"{what} {path} is over the {max_bytes}-byte limit")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise CheckpointError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{what} {path} is over the {max_bytes}-byte limit")
    return data


def read_checked(path: str | Path, *, max_bytes: int) -> bytes:
    """Read a weight file after refusing what is not a regular file or is too large."""
    data = read_regular_file(path, max_bytes=max_bytes, what="weight file")
    read_safetensors_header(data)
    return data


def load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load`` after our header checks, with its errors typed."""
    read_safetensors_header(data)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"corrupt safetensors file: {exc}") from None


__all__ = [
    "Adapter",
    "AdapterMetadata",
    "BaseModelMismatchError",
    "concat",
    "content_hash",
    "load_safetensors",
    "read_checked",
    "read_regular_file",
    "read_safetensors_header",
]
