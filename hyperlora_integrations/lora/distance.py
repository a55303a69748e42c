"""How far apart two LoRA deltas are, computed from their factors.

A LoRA's A and B are not unique (``B @ A == (B M) @ (M^-1 A)``), so comparing factors says
little; comparing the deltas ``B @ A`` does. The squared Frobenius distance needs only r x r
products: ``||B1 A1 - B2 A2||^2 = tr(B1'B1 A1A1') + tr(B2'B2 A2A2') - 2 tr(B1'B2 A2A1')``, so a
batch of 30-layer deltas (576 x 1536 each) is compared without ever forming one.
"""

from __future__ import annotations

import torch


def _inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F over the last two axes; A: (..., r, d_in), B: (..., d_out, r)."""
    return ((b1.transpose(-1, -2) @ b2) * (a1 @ a2.transpose(-1, -2))).sum((-1, -2))


def delta_sq_distance(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``||B1 A1 - B2 A2||_F^2`` and ``||B2 A2||_F^2`` (the reference's energy), per leading index.

    Ranks may differ. Broadcasts over leading axes (batch, layer), so the relative error of a
    generated adapter against a fitted one is ``dist.sum(-1) / ref.sum(-1)`` over layers.
    """
    ref = _inner(a2, b2, a2, b2)
    dist = _inner(a1, b1, a1, b1) + ref - 2 * _inner(a1, b1, a2, b2)
    return dist.clamp_min(0), ref.expand_as(dist)
