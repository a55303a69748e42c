"""Hypernetwork configs: architecture plus the base model they were trained for.

A checkpoint is ``config.json`` (one of these) and ``model.safetensors``; the config names the
base model and its architecture fingerprint so loading against another model fails loudly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..lora import LoraSpec


class HypernetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    base_model: str
    base_fingerprint: str
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    # (d_in, d_out) of every target module, read off the base model when the net is built
    module_shapes: dict[str, tuple[int, int]]
    lora: LoraSpec = LoraSpec()
    latent_dim: int = Field(256, ge=8)
    num_heads: int = Field(4, ge=1)


class D2LConfig(HypernetConfig):
    """Doc-to-LoRA: Perceiver over the base model's per-layer activations."""

    kind: Literal["d2l"] = "d2l"
    num_latents: int = Field(16, ge=1)
    num_blocks: int = Field(2, ge=1)
    chunk_len: int = Field(512, ge=16)  # longest chunk seen in training; longer documents are split
    # Most chunks rank-concatenated in training. Beyond it, chunk deltas are scaled by
    # trained_chunks / n so their sum keeps the magnitude training produced (DocToLoRA.internalize).
    trained_chunks: int = Field(4, ge=1)
    # Centred hypernetwork (0: off): every document adapter has the mean of this many reference
    # adapters subtracted and a learned static adapter added (DocToLoRA.centering).
    center_bank: int = Field(0, ge=0)
    max_document_tokens: int = Field(1_000_000, ge=1)


class T2LConfig(HypernetConfig):
    """Text-to-LoRA: MLP from a description embedding (+ layer and module embeddings)."""

    kind: Literal["t2l"] = "t2l"
    embed_dim: int = Field(576, ge=1)
    # how descriptions are embedded (encoders.description): the base model's own or MiniLM
    encoder: Literal["base-mean", "minilm"] = "base-mean"
    num_res_blocks: int = Field(2, ge=0)
    max_description_tokens: int = Field(256, ge=1)
