"""Scoring: the summed negative log-likelihood of a completion, the quality basis of every
evaluation and benchmark (no sampling, one forward pass; ``score_options`` shares the prompt's
KV cache across multiple-choice options)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .chat import Prompt, encode_text
from .errors import InvalidInputError
from .lora import Adapter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .base_model import BaseModel
    from .lora import LoRAInjector


class ScoringMixin:
    """``HyperLoRAModel``'s scoring methods; the state they use is set up by its ``__init__``."""

    base: BaseModel
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    injector: LoRAInjector

    def score_detailed(
        self,
        prompt: Prompt,
        completion: str,
        adapters: Sequence[Adapter] = (),
        *,
        system: str | None = None,
        context: str | None = None,
    ) -> tuple[float, int]:
        """(summed NLL in nats, number of completion tokens) of ``completion`` after ``prompt``."""
        adapters = self._checked(adapters)
        prompt_ids = self.encode(prompt, system=system, context=context)
        target = encode_text(self.tokenizer, completion)
        if not target:
            raise InvalidInputError("completion is empty")
        ids = torch.tensor([prompt_ids + target], device=self.base.device)
        with torch.no_grad(), self.injector.activate(adapters):
            logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, len(prompt_ids) :], reduction="sum")
        return float(nll), len(target)

    def score_options(
        self,
        prompt: Prompt,
        options: Sequence[str],
        adapters: Sequence[Adapter] = (),
        *,
        system: str | None = None,
        context: str | None = None,
    ) -> list[tuple[float, int]]:
        """``score_detailed`` of each option after one shared prompt.

        Multiple-choice scoring spends nearly all its time on the prompt; it is encoded once and
        its KV cache is cropped back after each option instead of being recomputed per option.
        """
        adapters = self._checked(adapters)
        prompt_ids = self.encode(prompt, system=system, context=context)
        targets = [encode_text(self.tokenizer, option) for option in options]
        if not targets or not all(targets):
            raise InvalidInputError("options must be non-empty strings")
        device = self.base.device
        scores = []
        with torch.no_grad(), self.injector.activate(adapters):
            out = self.model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
            cache, first = out.cache, out.logits[0, -1:]
            for target in targets:
                logits = first
                if len(target) > 1:
                    rest = self.model(input_ids=torch.tensor([target[:-1]], device=device), cache=cache)
                    logits = torch.cat([first, rest.logits[0]])
                    cache.crop(-(len(target) - 1))  # negative: tokens to drop (old and new API alike)
                nll = torch.nn.functional.cross_entropy(
                    logits.float(), torch.tensor(target, device=device), reduction="sum"
                )
                scores.append((float(nll), len(target)))
        return scores

    def score(self, prompt: Prompt, completion: str, adapters: Sequence[Adapter] = (), **kwargs) -> float:
        """Summed negative log-likelihood of ``completion`` given ``prompt``: our quality basis."""
        return self.score_detailed(prompt, completion, adapters, **kwargs)[0]
