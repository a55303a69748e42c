"""Rank compression: the best rank-``k`` approximation of an adapter's delta, per layer.

Rank concatenation makes a long document's adapter grow by ``r`` per chunk. Its delta
``B @ A`` per layer has rank ``n_chunks * r`` but usually a fast-decaying spectrum, so a
truncated SVD keeps most of it in far fewer bytes. The SVD is taken of the small core
``R_B @ R_A^T`` (from QR factors of B and A^T), never of the full ``d_out x d_in`` matrix, so
compressing costs O((d_in + d_out) r^2) per layer rather than O(d_in d_out r).
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from .adapter import Adapter


def _svd(a: torch.Tensor, b: torch.Tensor, values_only: bool = False):
    """SVD of the per-layer delta ``b @ a`` (a: (L, R, d_in), b: (L, d_out, R)), in fp64.

    Below the matrix's own size the rank-R core from QR factors is the cheap route; a delta of
    higher rank than that (a weighted sum of hundreds of adapters, say) is cheaper to take whole.
    """
    if a.shape[1] >= min(a.shape[2], b.shape[1]) // 2:
        delta = b @ a
        return torch.linalg.svdvals(delta) if values_only else torch.linalg.svd(delta, full_matrices=False)
    qb, rb = torch.linalg.qr(b)  # (L, d_out, R), (L, R, R)
    qa, ra = torch.linalg.qr(a.transpose(1, 2))  # (L, d_in, R), (L, R, R)
    core = rb @ ra.transpose(1, 2)
    if values_only:
        return torch.linalg.svdvals(core)
    u, s, vh = torch.linalg.svd(core)
    return qb @ u, s, vh @ qa.transpose(1, 2)


def compress(adapter: Adapter, max_rank: int) -> Adapter:
    """Return ``adapter`` with every module's rank cut to ``max_rank`` (Eckart-Young optimal)."""
    if max_rank < 1:
        raise InvalidInputError("max_rank must be >= 1")
    if adapter.rank <= max_rank and all(a.shape[1] <= max_rank for a in adapter.A.values()):
        return adapter
    folded_A, folded_B = adapter.folded()
    A_out, B_out = {}, {}
    for name in folded_A:
        a = folded_A[name].to(torch.float64)  # (L, R, d_in)
        b = folded_B[name].to(torch.float64)  # (L, d_out, R)
        if a.shape[1] <= max_rank:
            A_out[name], B_out[name] = folded_A[name], folded_B[name]
            continue
        u, s, vh = _svd(a, b)
        k = max_rank
        root = s[:, :k].sqrt()
        B_out[name] = (u[:, :, :k] * root[:, None, :]).to(folded_B[name].dtype)
        A_out[name] = (root[:, :, None] * vh[:, :k, :]).to(folded_A[name].dtype)
    meta = adapter.metadata.model_copy()
    meta.compressed_from_rank = adapter.rank
    return Adapter(A_out, B_out, scaling=1.0, metadata=meta)


def retained_energy(adapter: Adapter, max_rank: int) -> float:
    """Share of the delta's squared Frobenius norm a rank-``max_rank`` cut keeps (1.0 = lossless)."""
    folded_A, folded_B = adapter.folded()
    kept = total = 0.0
    for name in folded_A:
        a, b = folded_A[name].to(torch.float64), folded_B[name].to(torch.float64)
        s = _svd(a, b, values_only=True).pow(2)
        kept += float(s[:, :max_rank].sum())
        total += float(s.sum())
    return kept / total if total > 0 else 1.0
