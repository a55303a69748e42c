"""``ModelSpec``: which model a Ray replica or ingest actor loads, as plain data.

Ray ships constructor arguments to other processes (and nodes) by pickling them; a loaded
``HyperLoRAModel`` is hundreds of MB and would be copied once per actor. A spec is a few strings,
and every process that loads it gets the same weights, hence the same fingerprint, so adapters
made by ingest actors fit the serving replicas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


class ModelSpec(BaseModel):
    """A base model and its hypernetworks by name; ``tiny=True`` is the test suite's random model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str | None = None
    """HF id or local path; ``None``: the embedded default (SmolLM2-135M-Instruct)."""
    d2l: str | None = "default"
    t2l: str | None = "default"
    tiny: bool = False
    """The tiny random model of ``hyperlora_integrations.testing`` (tests and smoke runs only)."""
    tiny_seed: int = 0
    tiny_adapter_scale: float = Field(0.5, gt=0)
    """Output scale of the tiny hypernets; tests raise it so each adapter visibly changes greedy output."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per process; set it so replicas on one machine do not oversubscribe cores."""

    def load(self) -> HyperLoRAModel:
        import torch

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        if self.tiny:
            from ..testing import tiny_hyperlora_model

            model = tiny_hyperlora_model(self.tiny_seed)
            with torch.no_grad():
                for net in (model.d2l, model.t2l):
                    for head in net.heads.values():
                        head.b_scale.fill_(self.tiny_adapter_scale)
            return model
        from ..model import HyperLoRAModel

        return HyperLoRAModel.from_pretrained(self.base_model, d2l=self.d2l, t2l=self.t2l)
