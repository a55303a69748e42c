"""``ConsolidationConfig``: how a document (or a skill's description) is learned into an adapter."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ConsolidationConfig(BaseModel):
    """Shape, optimiser and self-supervised objective of consolidation.

    Defaults are the measured recipe (docs/doc-to-lora.md, "Consolidation"): rank 8 on
    ``down_proj`` -- the same shape the Doc-to-LoRA hypernetwork emits, so an instant adapter can
    be the starting point -- trained with Adam on targets built from the document alone.
    ``layers`` limits training to the top N layers: gradients stop there and the frozen layers
    below run once per distinct sequence instead of once per step, so a fit costs about half as
    much (the layers below keep whatever the starting adapter had). It is not the default:
    with the top 8 of SmolLM2's 30 layers, the NLL gap closed was about the same (95 % against
    106 % on the 32 test documents) but greedy answers contained the gold answer 15/96 times
    against 30/96 with every layer trained (docs/doc-to-lora.md).
    """

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, le=256)
    target_modules: tuple[str, ...] = ("down_proj",)
    layers: int | None = Field(None, ge=1, description="train only the top N layers (None: all)")
    alpha: float = Field(16.0, gt=0)
    steps: int = Field(30, ge=1, le=100_000)
    lr: float = Field(5e-3, gt=0, le=1.0)
    batch_size: int = Field(4, ge=1, le=256)
    max_seq_tokens: int = Field(256, ge=16, le=8192)
    chunk_tokens: int = Field(512, ge=32, le=8192, description="a longer document is consolidated chunk by chunk")
    max_bytes: int = Field(8 * 2**20, ge=1024, description="adapter byte budget per document (rank is cut to fit)")
    grad_clip: float = Field(1.0, gt=0)
    recite_chars: int = Field(
        600, ge=50, le=100_000, description="a recitation turn covers at most this many characters of the text"
    )
    packing: bool = Field(
        True, description="run each step's rows as one prefix tree where the model computes it exactly (packing.py)"
    )
    # objective mix: relative sampling weights of the self-supervised example kinds
    recite: float = Field(1.0, ge=0)
    continuation: float = Field(1.0, ge=0)
    fact: float = Field(0.5, ge=0)
    cloze: float = Field(1.0, ge=0)

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError("target_modules needs at least one module name such as 'down_proj'")
        return tuple(value)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
