"""How far apart two LoRA deltas are, computed from their factors.

A LoRA's A and B are not unique (``B @ A == (B M) @ (M^-1 A)``), so comparing factors says
little; comparing the deltas ``B @ A`` does. The squared Frobenius distance needs only r x r
products: ``||B1 A1 - B2 A2||^2 = tr(B1'B1 A1A1') + tr(B2'B2 A2A2') - 2 tr(B1'B2 A2A1')``, so a
batch of 30-layer deltas (576 x 1536 each) is compared without ever forming one.

With ``gram`` (the second moment ``E[x x']`` of the layer's inputs) the distance is the one the
model sees: ``E||(dW1 - dW2) x||^2``, the mean squared difference of the two deltas' outputs on
real activations. Directions of the input space that activations never take then cost nothing.
"""

from __future__ import annotations

import torch


def _inner(a1, b1, a2, b2, gram: torch.Tensor | None) -> torch.Tensor:
    """<B1 A1, B2 A2> (weighted by ``gram`` on the input side) over the last two axes."""
    left = a1 if gram is None else a1 @ gram
    return ((b1.transpose(-1, -2) @ b2) * (left @ a2.transpose(-1, -2))).sum((-1, -2))


def delta_sq_distance(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``||B1 A1 - B2 A2||^2`` and ``||B2 A2||^2`` (the reference's energy), per leading index.

    A: (..., r, d_in), B: (..., d_out, r); ranks may differ. Broadcasts over leading axes (batch,
    layer), so a generated adapter's relative error against a fitted one is
    ``dist.sum(-1) / ref.sum(-1)`` over layers. ``gram``: (..., d_in, d_in) input second
    moments, per layer, for the activation-weighted distance.
    """
    ref = _inner(a2, b2, a2, b2, gram)
    dist = _inner(a1, b1, a1, b1, gram) + ref - 2 * _inner(a1, b1, a2, b2, gram)
    return dist.clamp_min(0), ref.expand_as(dist)
