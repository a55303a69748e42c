"""The frozen layers below the trained ones, run once per distinct training sequence.

With ``layers=N`` only the top N layers train. Below them nothing changes during a fit, so the
hidden state each distinct sequence carries into the first trained layer is computed once,
without gradients, and every step runs only the top N layers. A fit draws each sequence about
twice (30 steps x 4 sequences from a few dozen distinct turns), so this removes most of the
forward cost of the frozen part.

Running a slice of the decoder means calling its layers directly, which is not part of any
model's public interface. So the split forward is checked once per fit against the model's own
forward; a model on which it differs (an embedding scale, per-layer attention kinds, a logit
cap) is trained with plain full forwards instead, which are always right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .packing import Packed, pad_right

if TYPE_CHECKING:
    from ..model import HyperLoRAModel

Seq = tuple[list[int], list[int]]
MAX_CACHE_BYTES = 512 * 2**20


def _run(inner, hidden: torch.Tensor, layers, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None):
    """Hidden states through ``layers`` of a Llama-style decoder, no cache: causal, or under a
    prefix tree's ``mask`` and ``pos`` (packing.py)."""
    from transformers.masking_utils import create_causal_mask

    if pos is None:
        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    if mask is None:
        mask = create_causal_mask(
            config=inner.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=pos
        )
    rope = inner.rotary_emb(hidden, position_ids=pos)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    return hidden


class FrozenPrefix:
    """Cached inputs of the first trained layer, keyed by sequence, and the top-only forward.

    Build it inside the fit's activation of the frozen layers' starting weights (they shape the
    cached states); call ``logits`` inside the per-step activation.
    """

    def __init__(self, model: HyperLoRAModel, first: int) -> None:
        self.lm = model.model
        self.inner = self.lm.get_decoder()
        self.first = first
        self.cache: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    @classmethod
    def build(cls, model: HyperLoRAModel, sequences: Sequence[Seq], first: int, pad_id: int) -> FrozenPrefix | None:
        """The cache for ``sequences``, or None when the split forward is not exact for this model,
        nothing is frozen, or the cache would not fit ``MAX_CACHE_BYTES``."""
        if first <= 0:
            return None
        self = cls(model, first)
        try:
            layers = self.inner.layers
            hidden_size = self.inner.config.hidden_size
        except AttributeError:
            return None
        distinct = {(tuple(p), tuple(t)): None for p, t in sequences}
        tokens = sum(len(p) + len(t) for p, t in distinct)
        if tokens * hidden_size * 4 > MAX_CACHE_BYTES:
            return None
        keys = sorted(distinct, key=lambda k: len(k[0]) + len(k[1]))
        device = model.base.device
        with torch.no_grad():
            try:
                if not self._exact(keys[-1], pad_id, device):
                    return None
            except Exception:  # an architecture whose layers take other arguments
                return None
            for i in range(0, len(keys), 8):
                group = keys[i : i + 8]
                ids = pad_right([list(p) + list(t) for p, t in group], pad_id, device)
                hidden = _run(self.inner, self.inner.embed_tokens(ids), layers[:first])
                for row, key in enumerate(group):
                    self.cache[key] = hidden[row, : len(key[0]) + len(key[1])].clone()
        return self

    def _exact(self, key, pad_id: int, device) -> bool:
        ids = pad_right([list(key[0]) + list(key[1])], pad_id, device)
        full = self.lm(input_ids=ids).logits
        split = self.logits(_run(self.inner, self.inner.embed_tokens(ids), self.inner.layers[: self.first]))
        return torch.allclose(full.float(), split.float(), atol=1e-3, rtol=1e-3)

    def hidden(self, rows: Sequence[Seq], origin: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """The rows' cached states: right-padded with zeros (causal: real tokens never see pads),
        or, given a prefix tree's ``origin``, one per tree node."""
        states = [self.cache[(tuple(p), tuple(t))] for p, t in rows]
        if origin is not None:
            return torch.stack([states[r][j] for r, j in origin]).unsqueeze(0)
        width = max(s.shape[0] for s in states)
        out = states[0].new_zeros(len(states), width, states[0].shape[-1])
        for row, s in enumerate(states):
            out[row, : s.shape[0]] = s
        return out

    def logits(self, hidden: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """Top layers, final norm and the vocabulary projection: at ``packed.keep`` only, under a
        tree's mask and positions where ``packed`` has them; every position, causal, without it."""
        if packed is None:
            return self.lm.get_output_embeddings()(
                self.inner.norm(_run(self.inner, hidden, self.inner.layers[self.first :]))
            )
        top = _run(self.inner, hidden, self.inner.layers[self.first :], packed.attention_mask, packed.position_ids)
        return self.lm.get_output_embeddings()(self.inner.norm(top)[:, packed.keep])
