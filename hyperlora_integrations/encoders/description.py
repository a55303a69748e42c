"""Description embeddings for Text-to-LoRA, from the frozen base model itself.

The published design uses a separate sentence encoder; ours needs no download, so the default is
the base model's own mean-pooled hidden state at a middle layer (middle layers carry more task
semantics than the next-token-shaped last layer). Embeddings are L2-normalised.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..chat import encode_text
from ..errors import InvalidInputError


class DescriptionEncoder:
    """Embeds descriptions with ``layer``'s mean-pooled hidden state; keeps a small LRU cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        layer: int | None = None,
        max_tokens: int = 256,
        cache_size: int = 1024,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer if layer is not None else model.config.num_hidden_layers // 2
        self.max_tokens = max_tokens
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        ids = encode_text(self.tokenizer, text)[: self.max_tokens]
        device = next(self.model.parameters()).device
        hidden = _hidden_at(self.model, torch.tensor([ids], device=device), self.layer)
        return F.normalize(hidden[0].mean(0).float(), dim=-1)

    def encode(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("a description must be a non-empty string")
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        emb = self._embed(text)
        with self._lock:
            self._cache[text] = emb
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return emb

    def encode_many(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts])


class _Stop(Exception):
    pass


# The capture list of the ``_hidden_at`` call running in *this* thread/task. The pre-hook sits on
# the shared model, so every other thread's forward passes through it too: it must act only in
# the context that installed it (else a concurrent ``generate`` would be cut short by ``_Stop``).
_CAPTURE: ContextVar[list | None] = ContextVar("hyperlora_description_capture", default=None)


def _hidden_at(model: PreTrainedModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Input hidden state of ``layer``, running only layers ``0..layer-1`` (halves the cost)."""
    layers = model.model.layers
    if layer >= len(layers):
        return model.model(input_ids=ids, use_cache=False).last_hidden_state
    captured: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        if _CAPTURE.get() is not captured:
            return None
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    token = _CAPTURE.set(captured)
    handle = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
        _CAPTURE.reset(token)
    return captured[0]
