"""Where LoRA goes in a base model and at what rank."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LoraSpec(BaseModel):
    """Target modules (by their short names, e.g. ``down_proj``) and rank of generated adapters.

    ``alpha`` follows PEFT: the delta is ``alpha / rank * B @ A``. Hypernetworks emit A and B
    directly, so alpha only sets the scale the exported PEFT adapter reproduces.
    """

    model_config = ConfigDict(frozen=True)

    target_modules: tuple[str, ...] = ("down_proj",)
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one target module is needed")
        return tuple(value)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
