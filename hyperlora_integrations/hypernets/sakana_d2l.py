"""Sakana AI's released Doc-to-LoRA generator, re-implemented so their checkpoints run here.

Their D2L (SakanaAI/doc-to-lora, ``ctx_to_lora.modeling.hypernet.HyperLoRA``) differs from ours
(``d2l.DocToLoRA``) in every block, so it is its own module, with parameter names equal to the keys
of their state dict (an imported checkpoint loads with ``strict=True``):

* context: the base model's hidden states with its *last* layer dropped: the embeddings, the raw
  outputs of layers ``0..L-3`` and the final-normed output of layer ``L-2`` (their
  ``PerLayerActivations`` truncates ``layers[:-1]``, so HF's final norm lands on that one);
* aggregator: an Idefics2-style Perceiver run per layer (layers are the batch): a gated-MLP
  projection, an encoder of cross-attention (and optional self-attention) blocks over learned
  latents, RMSNorm, then a one-block decoder with ``modules * rank`` queries; attention has 16
  heads of 128 and 4 key/value heads whatever the width (their config's defaults);
* per-layer residual MLPs (``einops.EinMix`` weights ``(L, d_in, d_out)``), L2 row normalisation,
  a per-layer (per-module) linear head emitting ``[A | B]`` rows, learned scalers on A and B;
* a learned "bias" LoRA of the same rank appended after the chunk LoRAs (``combine_lora``), and
  ``lora_alpha`` (``2 * r ** 1.5``) as the scaling of the whole delta (their ``lora_forward``).

Documents are wrapped the way their ``tokenize_ctx_text`` does with their chat templates (see
``sakana_templates``) and, past ``chunk_len`` tokens, split like their ``split_too_long_ctx``.
Parity with their code: tests/test_sakana_d2l.py on fixtures their code generated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..errors import BaseModelMismatchError, DocumentTooLargeError, EmptyDocumentError, InvalidInputError
from ..lora import Adapter, AdapterMetadata
from .base import Hypernetwork
from .config import HypernetConfig
from .sakana_templates import Family, document_ids, split_chunks

if TYPE_CHECKING:
    from .base import HostModel


class SakanaD2LConfig(HypernetConfig):
    """Their ``HypernetConfig`` + ``AggregatorConfig``, as far as inference needs them.

    ``lora.alpha`` is ``lora_alpha * rank`` so that ``lora.scaling`` is their delta factor
    ``lora_alpha`` (they multiply by alpha, not alpha / r).
    """

    kind: Literal["sakana-d2l"] = "sakana-d2l"
    family: Family
    n_latent_queries: int = Field(ge=1, le=4096)
    num_blocks: int = Field(ge=1, le=64)
    num_self_attn_per_block: int = Field(0, ge=0, le=16)
    shared_weights: bool = False
    per_layer_processing: bool = True
    num_pre_head_layers: int = Field(1, ge=0, le=64)
    use_bias: bool = True
    attn_heads: int = Field(16, ge=1, le=256)
    attn_head_dim: int = Field(128, ge=1, le=1024)
    attn_kv_heads: int = Field(4, ge=1, le=256)
    rms_norm_eps: float = Field(1e-6, gt=0, le=1)
    # their evaluation splits documents over max_ctx_chunk_len=8192 tokens (scripts/main_exp/eval)
    chunk_len: int = Field(8192, ge=0, le=2**31)
    bias_scaler: float = Field(1.0, allow_inf_nan=False)
    max_document_tokens: int = Field(1_000_000, ge=1, le=2**31)
    # what their checkpoint recorded, kept for the record: they read activations from a 4-bit
    # copy of the base model when this is true (bitsandbytes, CUDA); we read full precision
    quantized_ctx_encoder: bool = False
    source: str = ""


# --------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Non-causal multi-head attention with grouped key/value heads, no biases."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_heads: int) -> None:
        super().__init__()
        if heads % kv_heads:
            raise InvalidInputError(f"{heads} attention heads do not divide into {kv_heads} key/value heads")
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, tq, _ = queries.shape
        tk = keys.shape[1]
        rep = self.heads // self.kv_heads
        q = self.q_proj(queries).view(b, tq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(keys).view(b, tk, self.kv_heads, self.head_dim).transpose(1, 2).repeat_interleave(rep, 1)
        v = self.v_proj(keys).view(b, tk, self.kv_heads, self.head_dim).transpose(1, 2).repeat_interleave(rep, 1)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, tq, self.heads * self.head_dim))


class PerceiverLayer(nn.Module):
    """Their ``Idefics2PerceiverLayer``: cross-attention reads the (normed) context only."""

    def __init__(self, c: SakanaD2LConfig, cross: bool) -> None:
        super().__init__()
        dim, eps = c.latent_dim, c.rms_norm_eps
        self.cross = cross
        self.input_latents_layernorm = RMSNorm(dim, eps)
        self.input_context_layernorm = RMSNorm(dim, eps) if cross else nn.Identity()
        self.self_attn = Attention(dim, c.attn_heads, c.attn_head_dim, c.attn_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_ff_layernorm = RMSNorm(dim, eps)
        self.post_ff_layernorm = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, 4 * dim, dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        normed = self.input_latents_layernorm(latents)
        if self.cross:
            attended = self.self_attn(normed, self.input_context_layernorm(context), mask)
        else:
            attended = self.self_attn(normed, normed, None)
        latents = latents + self.post_attention_layernorm(attended)
        return latents + self.post_ff_layernorm(self.mlp(self.pre_ff_layernorm(latents)))


class Resampler(nn.Module):
    def __init__(self, c: SakanaD2LConfig, n_latents: int, num_blocks: int, self_per_block: int) -> None:
        super().__init__()
        self.latents_q = nn.Parameter(torch.randn(n_latents, c.latent_dim))
        first_self = [PerceiverLayer(c, cross=False) for _ in range(self_per_block)]
        layers: list[nn.Module] = [PerceiverLayer(c, cross=True), *first_self]
        shared_cross = None
        for _ in range(1, num_blocks):  # their weight sharing: one cross layer for blocks >= 1
            if c.shared_weights:
                shared_cross = shared_cross or PerceiverLayer(c, cross=True)
                layers.append(shared_cross)
                layers.extend(first_self)
            else:
                layers.append(PerceiverLayer(c, cross=True))
                layers.extend(PerceiverLayer(c, cross=False) for _ in range(self_per_block))
        self.layers = nn.ModuleList(layers)
        self.layernorm = RMSNorm(c.latent_dim, c.rms_norm_eps)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        latents = self.latents_q.unsqueeze(0).expand(context.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.layernorm(latents)


class Perceiver(nn.Module):
    def __init__(self, c: SakanaD2LConfig) -> None:
        super().__init__()
        n_out = len(c.module_shapes) * c.lora.rank
        self.modality_projection = GatedMLP(c.hidden_size, 4 * c.hidden_size, c.latent_dim)
        self.encoder = Resampler(c, c.n_latent_queries, c.num_blocks, c.num_self_attn_per_block)
        self.decoder = Resampler(c, n_out, 1, 0)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.encoder(self.modality_projection(context), mask))


class _Aggregator(nn.Module):  # a level of nesting only so parameter names match theirs
    def __init__(self, c: SakanaD2LConfig) -> None:
        super().__init__()
        self.perceiver = Perceiver(c)


class Mix(nn.Module):
    """``einops.EinMix`` with per-layer (and per-module) weights: ``x[..., l, (m), r, :] @ W[l, (m)]``."""

    def __init__(self, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(weight_shape))
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, L, M, r, d_in)``."""
        if self.weight.dim() == 3:
            out = torch.einsum("blmrd,lde->blmre", x, self.weight)
        else:
            out = torch.einsum("blmrd,lmde->blmre", x, self.weight)
        return out + self.bias if self.bias is not None else out


class ResMLPPerLayer(nn.Module):
    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.LayerNorm(dim),
            Mix((layers, dim, 4 * dim), (1, layers, 1, 1, 4 * dim)),
            nn.SiLU(),
            Mix((layers, 4 * dim, dim), (1, layers, 1, 1, dim)),
            nn.LayerNorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class ResMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Dropout(0.0),
            nn.Linear(dim, 4 * dim),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(4 * dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


# --------------------------------------------------------------------------- the generator
class SakanaDocToLoRA(Hypernetwork):
    config_class = SakanaD2LConfig
    role: ClassVar[str] = "d2l"

    def __init__(self, config: SakanaD2LConfig) -> None:
        super().__init__(config)
        c = config
        layers, rank, dim = c.num_layers, c.lora.rank, c.latent_dim
        self.modules_order = sorted(c.module_shapes)
        n_mod = len(self.modules_order)
        self.d_lora = max(d_in + d_out for d_in, d_out in c.module_shapes.values())
        self.aggregator = _Aggregator(c)
        block = (lambda: ResMLPPerLayer(layers, dim)) if c.per_layer_processing else (lambda: ResMLP(dim))
        self.layers = nn.Sequential(*(block() for _ in range(c.num_pre_head_layers)))
        head_shape = (layers, dim, self.d_lora) if n_mod == 1 else (layers, n_mod, dim, self.d_lora)
        self.head = Mix(head_shape, None)
        shapes = c.module_shapes
        self.bias_A = nn.ParameterDict({m: nn.Parameter(torch.zeros(layers, rank, shapes[m][0])) for m in shapes})
        self.bias_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(layers, rank, shapes[m][1])) for m in shapes})
        self.scaler_A = nn.ParameterDict({m: nn.Parameter(torch.ones(1, layers, rank, 1)) for m in shapes})
        self.scaler_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, layers, rank, 1)) for m in shapes})

    def forward(
        self, acts: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``acts (B, L, T, H)`` -> their layout: A ``{m: (B, L, r, d_in)}``, B ``{m: (B, L, r, d_out)}``.

        ``mask (B, T)``: True where a token is real. The bias LoRA is not included (``combine``).
        """
        c = self.config
        bsz, layers, t_len, hidden = acts.shape
        rank, n_mod = c.lora.rank, len(self.modules_order)
        flat_mask = mask.repeat(layers, 1) if mask is not None else None  # "(num_layers bs)": layer-major
        context = acts.transpose(0, 1).reshape(layers * bsz, t_len, hidden)
        x = self.aggregator.perceiver(context, flat_mask)  # (L * B, M * r, D)
        x = x.view(layers, bsz, n_mod, rank, -1).transpose(0, 1)  # (B, L, M, r, D)
        x = self.layers(x)
        x = x / torch.norm(x, dim=-1, keepdim=True)
        flat = self.head(x)
        A, B = {}, {}
        for i, m in enumerate(self.modules_order):
            d_in, d_out = c.module_shapes[m]
            A[m] = flat[:, :, i, :, :d_in] * self.scaler_A[m]
            B[m] = flat[:, :, i, :, d_in : d_in + d_out] * self.scaler_B[m]
        return A, B

    def combine(
        self, chunks: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], bias_scaler: float | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Their ``combine_lora`` for one document: chunk LoRAs then the bias LoRA, along the rank.

        Takes per-chunk ``(A (L, r, d_in), B (L, r, d_out))`` and returns their layout too.
        """
        scale = self.config.bias_scaler if bias_scaler is None else bias_scaler
        A, B = {}, {}
        for m in self.modules_order:
            a_parts = [a[m] for a, _ in chunks]
            b_parts = [b[m] for _, b in chunks]
            if self.config.use_bias:
                a_parts.append(self.bias_A[m] * scale)
                b_parts.append(self.bias_B[m] * scale)
            A[m], B[m] = torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=1)
        return A, B

    # ------------------------------------------------------------------ base model side
    def check_base(self, model: HostModel) -> None:
        """Same architecture (fingerprint, module shapes) *and* the model the checkpoint names."""
        from ..base_model import model_name

        super().check_base(model)
        if model_name(self.config.base_model) != model.name:
            raise BaseModelMismatchError(
                f"this Doc-to-LoRA checkpoint was trained for {self.config.base_model}; the loaded base model is "
                f"{model.name}. Load {self.config.base_model} (a local copy must sit in a folder named "
                f"{model_name(self.config.base_model)})."
            )

    @torch.no_grad()
    def activations(self, model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
        """``(L, T, H)``: what their ``PerLayerActivations`` returns for ``ids`` (see module docstring)."""
        device = next(model.parameters()).device
        out = model.model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False)
        hs, layers = out.hidden_states, self.config.num_layers
        if len(hs) != layers + 1:
            raise BaseModelMismatchError(f"base model returned {len(hs)} hidden states, expected {layers + 1}")
        return torch.stack([*hs[: layers - 1], model.model.norm(hs[layers - 1])], dim=1)[0]

    def document_chunks(self, tokenizer, text: str) -> list[list[int]]:
        """Token ids of each chunk, wrapped in their chat template (``sakana_templates``)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"a document must be str, got {type(text).__name__}")
        if not text.strip():
            raise EmptyDocumentError("the document is empty or whitespace only")
        if len(text) > self.config.max_document_tokens * 16:
            raise DocumentTooLargeError(f"document of {len(text)} characters is over the limit")
        ids = document_ids(tokenizer, self.config.family, text)
        if len(ids) > self.config.max_document_tokens:
            raise DocumentTooLargeError(
                f"document of {len(ids)} tokens is over max_document_tokens={self.config.max_document_tokens}"
            )
        return split_chunks(tokenizer, self.config.family, ids, self.config.chunk_len)

    @torch.no_grad()
    def internalize(
        self,
        model: HostModel,
        text: str,
        *,
        source: str = "",
        progress: bool | None = None,
        bias_scaler: float | None = None,
    ) -> Adapter:
        """One adapter for ``text``: every chunk's LoRA, then the bias LoRA, rank-concatenated.

        Chunks are encoded one at a time (memory does not grow with length); the result equals
        their batched ``generate_weights`` + ``combine_lora`` (checked by the parity tests).
        """
        chunks = self.document_chunks(model.tokenizer, text)
        self.eval()
        parts = []
        show = progress if progress is not None else len(chunks) > 4
        for ids in tqdm(chunks, desc="internalizing", unit="chunk", disable=not show):
            acts = self.activations(model.model, ids)
            A, B = self(acts[None].to(self.dtype))
            parts.append(({m: a[0] for m, a in A.items()}, {m: b[0] for m, b in B.items()}))
        A, B = self.combine(parts, bias_scaler)
        meta = AdapterMetadata.for_document(
            text,
            base_model=model.name,
            base_fingerprint=model.fingerprint,
            source=source,
            num_tokens=sum(len(c) for c in chunks),
            num_chunks=len(chunks),
            generator="sakana-d2l",
        )
        return Adapter(A, {m: b.transpose(1, 2) for m, b in B.items()}, scaling=self.config.lora.scaling, metadata=meta)
