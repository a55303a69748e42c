"""Merge an adapter into the base weights and take it out again.

For users who want one persistent patched model (no per-call hook work). The merged model is
shared by every caller, so this is the opposite of per-call activation: use one or the other.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from .adapter import Adapter
from .layer import LoRAInjector


def _apply(injector: LoRAInjector, adapter: Adapter, sign: float) -> None:
    injector.check(adapter)
    A, B = adapter.folded()
    with torch.no_grad():
        for name in A:
            for layer in range(injector.num_layers):
                weight = injector.targets[(name, layer)].module.weight
                delta = B[name][layer].to(torch.float64) @ A[name][layer].to(torch.float64)
                weight.copy_((weight.to(torch.float64) + sign * delta).to(weight.dtype))


def merge(injector: LoRAInjector, adapter: Adapter) -> None:
    """Add ``adapter``'s delta into the weights (computed in float64 to keep unmerge exact)."""
    if any(a.id == adapter.id for a in injector.merged):
        raise InvalidInputError(f"adapter {adapter.id[:8]} is already merged")
    _apply(injector, adapter, +1.0)
    injector.merged.append(adapter)


def unmerge(injector: LoRAInjector, adapter: Adapter) -> None:
    """Subtract a previously merged adapter's delta again."""
    for i, merged in enumerate(injector.merged):
        if merged.id == adapter.id:
            _apply(injector, merged, -1.0)
            del injector.merged[i]
            return
    raise InvalidInputError(f"adapter {adapter.id[:8]} is not merged")
