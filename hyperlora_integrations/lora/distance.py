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


def delta_inner_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G[i, j] = <B_i A_i, B_j A_j>`` summed over layers, for N adapters of one rank.

    A: (N, L, r, d_in), B: (N, L, d_out, r). Every prediction that is a weighted sum of library
    deltas (a mean, a nearest neighbour, a kernel regression) is a coefficient vector c, and its
    squared error against adapter t is ``c'Gc - 2 c'G[:, t] + G[t, t]``: one Gram matrix, one
    (N r x N r) product per layer, replaces a distance computation per prediction. Float64.
    """
    n, layers, r = a.shape[0], a.shape[1], a.shape[2]
    out = torch.zeros(n, n, dtype=torch.float64)
    for layer in range(layers):
        aa = a[:, layer].reshape(n * r, -1).double()
        bt = b[:, layer].transpose(-1, -2).reshape(n * r, -1).double()
        out += ((aa @ aa.T) * (bt @ bt.T)).reshape(n, r, n, r).sum((1, 3))
    return out
