"""Doc-to-LoRA: a document's per-layer activations in, one LoRA per layer out.

A Perceiver-style aggregator maps any number of tokens to a fixed set of latents per layer
(cross-attention only), a one-block decoder turns them into one query per (module, rank row),
and a per-module head emits that row of A and B. All layers run as one batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..chat import context_prefix, encode_text
from ..encoders.activations import chunk_ids, document_activations
from ..errors import DocumentTooLargeError, EmptyDocumentError, InvalidInputError
from ..lora import Adapter, AdapterMetadata, concat
from .base import Hypernetwork
from .blocks import CrossAttention, LoRAHead
from .config import D2LConfig

if TYPE_CHECKING:
    from .base import HostModel


class DocToLoRA(Hypernetwork):
    config_class = D2LConfig

    def __init__(self, config: D2LConfig) -> None:
        super().__init__(config)
        c = config
        dim, layers, rank = c.latent_dim, c.num_layers, c.lora.rank
        self.modules_order = sorted(c.module_shapes)
        self.in_norm = nn.LayerNorm(c.hidden_size)
        self.in_proj = nn.Linear(c.hidden_size, dim)
        self.layer_emb = nn.Parameter(torch.randn(layers, dim) * 0.02)
        self.latents = nn.Parameter(torch.randn(c.num_latents, dim) * 0.02)
        self.encoder = nn.ModuleList(CrossAttention(dim, c.num_heads) for _ in range(c.num_blocks))
        self.out_queries = nn.Parameter(torch.randn(len(self.modules_order) * rank, dim) * 0.02)
        self.decoder = CrossAttention(dim, c.num_heads)
        self.heads = nn.ModuleDict(
            {m: LoRAHead(dim, *c.module_shapes[m], num_layers=layers, rank=rank) for m in self.modules_order}
        )
        if c.center_bank:
            # Reference adapters (buffers, refreshed during training) and a static adapter of
            # the same rank (learned): see ``centering``.
            rows = c.center_bank * rank
            self.static_A = nn.ParameterDict()
            self.static_B = nn.ParameterDict()
            for m in self.modules_order:
                d_in, d_out = c.module_shapes[m]
                self.register_buffer(f"ref_A_{m}", torch.zeros(layers, rows, d_in))
                self.register_buffer(f"ref_B_{m}", torch.zeros(layers, d_out, rows))
                self.static_A[m] = nn.Parameter(torch.zeros(layers, rows, d_in))
                self.static_B[m] = nn.Parameter(torch.zeros(layers, d_out, rows))

    # ------------------------------------------------------------------ centring
    def centering(self, weight: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Rank blocks that turn ``weight`` summed chunk adapters into centred ones.

        A plain hypernetwork can lower the distillation loss with an adapter that is the same for
        every document (how a model answers after reading *a* document), and ours did (see
        docs/doc-to-lora.md). A centred one subtracts ``weight`` times the mean of reference
        adapters (recent outputs, no gradient), so only what differs between documents reaches
        the model, and adds a learned static adapter that takes over the shared part.
        """
        k = self.config.center_bank
        A, B = {}, {}
        for m in self.modules_order:
            A[m] = torch.cat([getattr(self, f"ref_A_{m}"), self.static_A[m]], dim=1)
            B[m] = torch.cat([getattr(self, f"ref_B_{m}") * (-weight / k), self.static_B[m]], dim=2)
        return A, B

    @torch.no_grad()
    def set_reference(self, bank: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> None:
        """Store ``center_bank`` recent single-chunk adapters ``(A, B)`` (scaling folded) as reference."""
        for m in self.modules_order:
            getattr(self, f"ref_A_{m}").copy_(torch.cat([a[m] for a, _ in bank], dim=1))
            getattr(self, f"ref_B_{m}").copy_(torch.cat([b[m] for _, b in bank], dim=2))

    def reference_bank(self) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """The stored reference adapters, one ``(A, B)`` per bank slot (to resume training)."""
        rank = self.config.lora.rank
        return [
            (
                {m: getattr(self, f"ref_A_{m}")[:, i * rank : (i + 1) * rank].clone() for m in self.modules_order},
                {m: getattr(self, f"ref_B_{m}")[:, :, i * rank : (i + 1) * rank].clone() for m in self.modules_order},
            )
            for i in range(self.config.center_bank)
        ]

    @torch.no_grad()
    def init_static_from_reference(self) -> None:
        """Static adapter := mean reference adapter, so centring starts as the identity."""
        k = self.config.center_bank
        for m in self.modules_order:
            self.static_A[m].copy_(getattr(self, f"ref_A_{m}"))
            self.static_B[m].copy_(getattr(self, f"ref_B_{m}") / k)

    def forward(
        self, acts: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``acts (B, L, T, H)`` -> A ``{m: (B, L, r, d_in)}``, B ``{m: (B, L, d_out, r)}``."""
        bsz, layers, t_len, _ = acts.shape
        c = self.config
        dim, rank = c.latent_dim, c.lora.rank
        x = self.in_proj(self.in_norm(acts)) + self.layer_emb[None, :, None, :]
        x = x.reshape(bsz * layers, t_len, dim)
        flat_mask = (
            mask[:, None, :].expand(bsz, layers, t_len).reshape(bsz * layers, t_len) if mask is not None else None
        )
        lat = (self.latents[None] + self.layer_emb[:, None, :]).repeat(bsz, 1, 1)
        for block in self.encoder:
            lat = block(lat, x, flat_mask)
        queries = (self.out_queries[None] + self.layer_emb[:, None, :]).repeat(bsz, 1, 1)
        z = self.decoder(queries, lat).view(bsz, layers, len(self.modules_order), rank, dim)
        A, B = {}, {}
        for i, name in enumerate(self.modules_order):
            A[name], B[name] = self.heads[name](z[:, :, i])
        return A, B

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def internalize(self, model: HostModel, text: str, *, source: str = "", progress: bool | None = None) -> Adapter:
        """Encode ``text`` chunk by chunk and concatenate the chunk adapters along the rank axis.

        Only one chunk's activations exist at a time, so memory does not grow with length
        (apart from the adapter itself, ``rank * chunks`` rows).

        A document of ``n`` chunks, more than the ``trained_chunks`` the hypernetwork learned to
        combine, has every chunk scaled by ``trained_chunks / n``. Chunk adapters share a
        document-independent component; summed over 22 chunks (8k tokens) unscaled it pushed
        gold-answer NLL from 4.1 (no adapter) to 8.8. Scaled, the sum keeps the magnitude training
        produced (measurements in docs/doc-to-lora.md).
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"a document must be str, got {type(text).__name__}")
        if not text.strip():
            raise EmptyDocumentError("the document is empty or whitespace only")
        max_chars = self.config.max_document_tokens * 16
        if len(text) > max_chars:  # refuse before tokenizing gigabytes
            raise DocumentTooLargeError(f"document of {len(text)} characters is over the limit")
        ids = encode_text(model.tokenizer, text)
        if len(ids) > self.config.max_document_tokens:
            raise DocumentTooLargeError(
                f"document of {len(ids)} tokens is over max_document_tokens={self.config.max_document_tokens}"
            )
        chunks = chunk_ids(ids, self.config.chunk_len)
        show = progress if progress is not None else len(chunks) > 4
        parts = []
        prefix = context_prefix(model.tokenizer)
        self.eval()
        scale = min(1.0, self.config.trained_chunks / len(chunks))
        for chunk in tqdm(chunks, desc="internalizing", unit="chunk", disable=not show):
            acts = document_activations(model.model, chunk, prefix)
            A, B = self(acts[None].to(self.dtype))
            parts.append(Adapter({k: v[0] for k, v in A.items()}, {k: v[0] for k, v in B.items()}, scaling=scale))
        if self.config.center_bank:
            A, B = self.centering(scale * len(chunks))
            parts.append(Adapter({k: v.detach() for k, v in A.items()}, {k: v.detach() for k, v in B.items()}))
        meta = AdapterMetadata.for_document(
            text,
            base_model=model.name,
            base_fingerprint=model.fingerprint,
            source=source,
            num_tokens=len(ids),
            num_chunks=len(chunks),
        )
        return concat(parts, metadata=meta)
