"""Functional LoRA: adapters applied per call through forward hooks, never by editing the model.

The hooks are installed once and read the adapters of the *current call* from a ``ContextVar``.
A context variable is private to its thread and to its asyncio task, so two requests sharing one
model can never see each other's adapters, and nothing stays active after the ``with`` block.
Because the delta is computed from the A/B tensors as given, gradients flow back into whatever
produced them: that is how hypernetworks are trained through the frozen model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BaseModelMismatchError, InvalidInputError
from .adapter import Adapter, concat

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LoRAWeights:
    """What the hooks read: per module, A ``(..., L, R, d_in)`` and B ``(..., L, d_out, R)``.

    A and B may also be per-layer lists (``None`` for a layer without a delta): consolidation
    trains only the top layers, and slices of one grad-carrying tensor would make autograd
    record (and backpropagate through) every layer below them. Scaling is already folded into B. A leading batch dimension lets each sequence of a batch
    carry its own adapter (used in training, where every document has its own).

    ``index`` (a long tensor, one entry per batch row) makes the leading dimension a table of
    adapter *slots* instead: row ``i`` uses slot ``index[i]``. Rows that share an adapter share
    its slot, so a batch of 32 requests over 3 adapters holds 3 copies, not 32 (the gathered
    LoRA of multi-adapter servers such as S-LoRA and Punica; used by ``batching.py``).
    """

    owner: int
    A: dict[str, torch.Tensor | Sequence[torch.Tensor | None]]
    B: dict[str, torch.Tensor | Sequence[torch.Tensor | None]]
    index: torch.Tensor | None = None


_ACTIVE: ContextVar[LoRAWeights | None] = ContextVar("hyperlora_active_lora", default=None)


@dataclass(frozen=True)
class TargetModule:
    path: str
    module: nn.Linear


class LoRAInjector:
    """Finds the per-layer linear modules of a decoder and hooks them once.

    Every ``nn.Linear`` under ``...layers.<i>.`` is hooked; a hook with no active adapter for its
    module costs one context-variable read, so unused targets are free.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.targets: dict[tuple[str, int], TargetModule] = {}
        for path, module in model.named_modules():
            match = _LAYER_RE.search(path)
            if match and isinstance(module, nn.Linear):
                short = path.rsplit(".", 1)[-1]
                self.targets[(short, int(match.group(1)))] = TargetModule(path, module)
        if not self.targets:
            raise InvalidInputError("no per-layer linear modules found: is this a decoder-only LM?")
        self.num_layers = 1 + max(layer for _, layer in self.targets)
        self.shapes: dict[str, tuple[int, int]] = {}
        for (short, _), target in self.targets.items():
            self.shapes[short] = (target.module.in_features, target.module.out_features)
        self._handles = [
            target.module.register_forward_hook(self._make_hook(short, layer))
            for (short, layer), target in self.targets.items()
        ]
        self.merged: list[Adapter] = []

    def _make_hook(self, short: str, layer: int):
        owner = id(self)

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            state = _ACTIVE.get()
            if state is None or state.owner != owner:
                return None
            a = state.A.get(short)
            if a is None:
                return None
            if isinstance(a, (list, tuple)):  # per-layer tensors; None where a layer has none
                a_l, b_l = a[layer], state.B[short][layer]
                if a_l is None:
                    return None
            else:
                a_l = a[..., layer, :, :]
                b_l = state.B[short][..., layer, :, :]
            if state.index is not None:  # slot table -> one (R, d) pair per row
                a_l = a_l.index_select(0, state.index)
                b_l = b_l.index_select(0, state.index)
            x = inputs[0]
            if a_l.dim() == 3 and x.dim() == 3 and a_l.shape[0] != x.shape[0]:
                raise InvalidInputError(f"batched adapter of size {a_l.shape[0]} for a batch of {x.shape[0]}")
            delta = (x.to(a_l.dtype) @ a_l.transpose(-1, -2)) @ b_l.transpose(-1, -2)
            return output + delta.to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ validation
    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter whose shapes do not fit this model before it reaches a matmul."""
        for name in adapter.A:
            if name not in self.shapes:
                raise BaseModelMismatchError(
                    f"adapter {adapter.id[:8]} targets {name!r}, which this model does not have "
                    f"(it has {sorted(self.shapes)})"
                )
            d_in, d_out = self.shapes[name]
            a, b = adapter.A[name], adapter.B[name]
            if a.shape[0] != self.num_layers or a.shape[2] != d_in or b.shape[1] != d_out:
                raise BaseModelMismatchError(
                    f"adapter {adapter.id[:8]} module {name!r} has A {tuple(a.shape)} / B {tuple(b.shape)}; "
                    f"this model needs ({self.num_layers}, r, {d_in}) / ({self.num_layers}, {d_out}, r)"
                )

    # ------------------------------------------------------------------ activation
    def folded(self, adapters: Sequence[Adapter]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Rank-concatenated, scaling-folded weights in the model's dtype and device.

        Adapters may be stored in half precision to save memory; the matmuls run in the
        model's own dtype (fp16 matmuls are slow on CPUs).
        """
        combined = concat(adapters) if len(adapters) > 1 else adapters[0]
        A, B = combined.folded()
        p = next(self.model.parameters())
        return (
            {k: v.to(device=p.device, dtype=p.dtype) for k, v in A.items()},
            {k: v.to(device=p.device, dtype=p.dtype) for k, v in B.items()},
        )

    @contextmanager
    def activate(self, adapters: Sequence[Adapter] = ()) -> Iterator[None]:
        """Apply ``adapters`` (rank-concatenated) to every forward pass inside the block.

        Scoped to the calling thread / asyncio task; an inner ``activate`` replaces the outer set
        for its duration. An empty sequence runs the bare base model.
        """
        adapters = list(adapters)
        for adapter in adapters:
            self.check(adapter)
        if not adapters:
            weights = None
        else:
            A, B = self.folded(adapters)
            weights = LoRAWeights(owner=id(self), A=A, B=B)
        token = _ACTIVE.set(weights)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    @contextmanager
    def activate_weights(
        self,
        A: dict[str, torch.Tensor | Sequence[torch.Tensor | None]],
        B: dict[str, torch.Tensor | Sequence[torch.Tensor | None]],
        index: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Lower-level activation of raw (possibly batched, grad-carrying) A/B with scaling folded in.

        With ``index``, ``A``/``B`` are slot tables ``(S, L, R, d)`` and batch row ``i`` uses slot
        ``index[i]`` (see ``LoRAWeights``).
        """
        token = _ACTIVE.set(LoRAWeights(owner=id(self), A=A, B=B, index=index))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def active_weights() -> LoRAWeights | None:
    """The LoRA weights active in this thread/task (None outside any ``activate`` block)."""
    return _ACTIVE.get()
