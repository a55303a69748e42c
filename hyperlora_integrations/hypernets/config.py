"""Hypernetwork configs: architecture plus the base model they were trained for.

A checkpoint is ``config.json`` (one of these) and ``model.safetensors``; the config names the
base model and its architecture fingerprint so loading against another model fails loudly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..lora import LoraSpec

# Upper bounds far above any real model (SmolLM2-135M: 30 layers, width 576; the largest open
# models: ~128 layers, width ~16k, MLP ~53k). They keep a forged config.json from sizing a net that
# cannot be built; ``checkpoint.load`` also compares the shapes with the weights file before it
# allocates anything.
_MAX_LAYERS, _MAX_WIDTH, _MAX_MODULES = 1024, 2**17, 64


class HypernetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    base_model: str
    base_fingerprint: str
    num_layers: int = Field(ge=1, le=_MAX_LAYERS)
    hidden_size: int = Field(ge=1, le=_MAX_WIDTH)
    # (d_in, d_out) of every target module, read off the base model when the net is built
    module_shapes: dict[str, tuple[int, int]]
    lora: LoraSpec = LoraSpec()
    latent_dim: int = Field(256, ge=8, le=2**14)
    num_heads: int = Field(4, ge=1, le=256)

    @field_validator("module_shapes")
    @classmethod
    def _bounded_shapes(cls, value: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        if not value or len(value) > _MAX_MODULES:
            raise ValueError(f"module_shapes needs 1 to {_MAX_MODULES} modules")
        for name, dims in value.items():
            if not all(1 <= d <= _MAX_WIDTH for d in dims):
                raise ValueError(f"module {name!r}: widths must be between 1 and {_MAX_WIDTH}, got {dims}")
        return value


class D2LConfig(HypernetConfig):
    """Doc-to-LoRA: Perceiver over the base model's per-layer activations."""

    kind: Literal["d2l"] = "d2l"
    num_latents: int = Field(16, ge=1, le=4096)
    num_blocks: int = Field(2, ge=1, le=64)
    chunk_len: int = Field(512, ge=16, le=2**20)  # longest chunk seen in training; longer documents are split
    # Most chunks rank-concatenated in training. Beyond it, chunk deltas are scaled by
    # trained_chunks / n so their sum keeps the magnitude training produced (DocToLoRA.internalize).
    trained_chunks: int = Field(4, ge=1, le=2**20)
    # Centred hypernetwork (0: off): every document adapter has the mean of this many reference
    # adapters subtracted and a learned static adapter added (DocToLoRA.centering).
    center_bank: int = Field(0, ge=0, le=1024)
    max_document_tokens: int = Field(1_000_000, ge=1, le=2**31)


class T2LConfig(HypernetConfig):
    """Text-to-LoRA: MLP from a description embedding (+ layer and module embeddings)."""

    kind: Literal["t2l"] = "t2l"
    embed_dim: int = Field(576, ge=1, le=_MAX_WIDTH)
    # how descriptions are embedded (encoders.description): the base model's own or MiniLM
    encoder: Literal["base-mean", "minilm"] = "base-mean"
    num_res_blocks: int = Field(2, ge=0, le=64)
    max_description_tokens: int = Field(256, ge=1, le=2**20)
