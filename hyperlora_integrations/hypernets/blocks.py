"""Small building blocks shared by the hypernetworks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Pre-norm cross-attention + MLP: queries read from a variable-length token set."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``queries (N, Q, D)``, ``tokens (N, T, D)``, ``mask (N, T)`` True where a token is real."""
        n, q_len, dim = queries.shape
        t_len = tokens.shape[1]
        h = self.heads
        q = self.q(self.norm_q(queries)).view(n, q_len, h, dim // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).chunk(2, dim=-1)
        k = k.view(n, t_len, h, dim // h).transpose(1, 2)
        v = v.view(n, t_len, h, dim // h).transpose(1, 2)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        queries = queries + self.out(att.transpose(1, 2).reshape(n, q_len, dim))
        return queries + self.mlp(self.norm_mlp(queries))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class LoRAHead(nn.Module):
    """Emits rank rows of ``[a | b]`` for one module type, shared across layers.

    Rows are L2-normalised and multiplied by learned per-layer, per-rank scales; the B scale
    starts at zero, so an untrained hypernetwork generates an exact zero delta.
    """

    def __init__(self, dim: int, d_in: int, d_out: int, num_layers: int, rank: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, d_in + d_out)
        self.a_scale = nn.Parameter(torch.ones(num_layers, rank))
        self.b_scale = nn.Parameter(torch.zeros(num_layers, rank))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z (B, L, r, D)`` -> A ``(B, L, r, d_in)``, B ``(B, L, d_out, r)``."""
        a, b = self.proj(self.norm(z)).split([self.d_in, self.d_out], dim=-1)
        a = F.normalize(a, dim=-1) * self.a_scale[None, :, :, None]
        b = F.normalize(b, dim=-1) * self.b_scale[None, :, :, None]
        return a, b.transpose(-1, -2)
