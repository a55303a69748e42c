"""What every hypernetwork shares: its config, base-model check and dtype, and ``HostModel``."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from ..errors import BaseModelMismatchError
from .config import HypernetConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..base_model import BaseModel
    from ..lora import LoRAInjector


class HostModel(Protocol):
    """What a hypernetwork reads of the model it serves. ``HyperLoRAModel`` satisfies it; with
    it ``hypernets/`` never imports ``model.py`` (which loads hypernetworks), not even for types."""

    base: BaseModel
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    injector: LoRAInjector


class Hypernetwork(nn.Module):
    config_class: ClassVar[type[HypernetConfig]]

    def __init__(self, config: HypernetConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_base(self, model: HostModel) -> None:
        """Refuse a base model other than the one this hypernetwork was trained for."""
        c = self.config
        if c.base_fingerprint != model.fingerprint:
            raise BaseModelMismatchError(
                f"this {c.kind} hypernetwork was trained for {c.base_model} ({c.base_fingerprint}); "
                f"the loaded base model is {model.name} ({model.fingerprint}). "
                f"Train one for it with `hyperlora train {c.kind} --base-model ...`."
            )
        for name, (d_in, d_out) in c.module_shapes.items():
            if model.injector.shapes.get(name) != (d_in, d_out):
                raise BaseModelMismatchError(f"module {name!r} of the base model does not have shape {(d_in, d_out)}")

    @classmethod
    def for_model(cls, model: HostModel, **overrides) -> Hypernetwork:
        """A freshly initialised hypernetwork sized for ``model``'s target modules."""
        from ..lora import LoraSpec

        lora = overrides.pop("lora", None) or LoraSpec()
        shapes = {}
        for name in lora.target_modules:
            if name not in model.injector.shapes:
                raise BaseModelMismatchError(f"base model has no module {name!r}")
            shapes[name] = model.injector.shapes[name]
        cfg = model.model.config
        config = cls.config_class(
            base_model=model.name,
            base_fingerprint=model.fingerprint,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            module_shapes=shapes,
            lora=lora,
            **overrides,
        )
        return cls(config)
