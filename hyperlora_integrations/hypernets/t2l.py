"""Text-to-LoRA: a task description in, a skill adapter out.

The description embedding is projected and concatenated with learned layer and module
embeddings; a learned rank embedding makes one query per (layer, module, rank row). A residual
MLP and the shared ``LoRAHead`` turn every query into one row of A and B, all in one batch.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InvalidInputError
from ..lora import Adapter, AdapterMetadata
from .base import Hypernetwork
from .blocks import LoRAHead, ResidualMLP
from .config import T2LConfig

if TYPE_CHECKING:
    from .base import HostModel


class TextToLoRA(Hypernetwork):
    config_class = T2LConfig

    def __init__(self, config: T2LConfig) -> None:
        super().__init__(config)
        c = config
        dim, layers, rank = c.latent_dim, c.num_layers, c.lora.rank
        self.modules_order = sorted(c.module_shapes)
        self.task_proj = nn.Sequential(nn.Linear(c.embed_dim, dim // 2), nn.LayerNorm(dim // 2))
        self.layer_emb = nn.Parameter(torch.randn(layers, dim // 4) * 0.02)
        self.module_emb = nn.Parameter(torch.randn(len(self.modules_order), dim - dim // 2 - dim // 4) * 0.02)
        self.rank_emb = nn.Parameter(torch.randn(rank, dim) * 0.02)
        # Description embeddings of a decoder share one huge common direction (cosine ~0.99
        # between unrelated tasks); standardising with training-set statistics exposes the part
        # that differs. Set once by training (``set_embedding_stats``), saved in the checkpoint.
        self.register_buffer("emb_mean", torch.zeros(c.embed_dim))
        self.register_buffer("emb_std", torch.ones(c.embed_dim))
        self.mixer = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.blocks = nn.Sequential(*(ResidualMLP(dim) for _ in range(c.num_res_blocks)))
        self.heads = nn.ModuleDict(
            {m: LoRAHead(dim, *c.module_shapes[m], num_layers=layers, rank=rank) for m in self.modules_order}
        )
        self._encoder = None
        self._encoder_for = lambda: None
        self._encoder_lock = threading.Lock()

    def forward(self, emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``emb (B, E)`` -> A ``{m: (B, L, r, d_in)}``, B ``{m: (B, L, d_out, r)}``."""
        bsz = emb.shape[0]
        emb = self.standardize(emb)
        layers, n_mod = self.layer_emb.shape[0], len(self.modules_order)
        task = self.task_proj(emb)[:, None, None, :].expand(bsz, layers, n_mod, -1)
        layer = self.layer_emb[None, :, None, :].expand(bsz, layers, n_mod, -1)
        module = self.module_emb[None, None, :, :].expand(bsz, layers, n_mod, -1)
        token = torch.cat([task, layer, module], dim=-1)  # (B, L, M, D)
        z = self.blocks(self.mixer(token[:, :, :, None, :] + self.rank_emb))  # (B, L, M, r, D)
        A, B = {}, {}
        for i, name in enumerate(self.modules_order):
            A[name], B[name] = self.heads[name](z[:, :, i])
        return A, B

    def standardize(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb - self.emb_mean) / self.emb_std

    @torch.no_grad()
    def set_embedding_stats(self, embeddings: torch.Tensor) -> None:
        """Per-dimension mean and std of the training descriptions' embeddings."""
        self.emb_mean.copy_(embeddings.mean(0))
        self.emb_std.copy_(embeddings.std(0).clamp_min(1e-6))

    def encoder(self, model: HostModel):
        """The description encoder this checkpoint was trained with (built once per base model)."""
        from ..encoders.description import description_encoder

        with self._encoder_lock:
            if self._encoder is None or self._encoder_for() is not model.model:
                self._encoder = description_encoder(
                    self.config.encoder, model.model, model.tokenizer, max_tokens=self.config.max_description_tokens
                )
                self._encoder_for = weakref.ref(model.model)  # a plain attribute would register the LM as a submodule
            return self._encoder

    @torch.no_grad()
    def generate_skill(self, model: HostModel, description: str) -> Adapter:
        if not isinstance(description, str) or not description.strip():
            raise InvalidInputError("a skill description must be a non-empty string")
        self.eval()
        emb = self.encoder(model).encode(description)
        A, B = self(emb[None].to(self.dtype))
        meta = AdapterMetadata.for_skill(
            description, base_model=model.name, base_fingerprint=model.fingerprint, source="generate_skill"
        )
        return Adapter({k: v[0] for k, v in A.items()}, {k: v[0] for k, v in B.items()}, metadata=meta)
