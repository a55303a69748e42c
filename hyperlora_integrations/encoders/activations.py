"""The base model's own per-layer hidden states over a document: Doc-to-LoRA's context encoder.

Layer ``l``'s input activations feed the generator of layer ``l``'s LoRA, so the adapter for a
layer is computed from what that layer actually sees.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def chunk_ids(ids: list[int], chunk_len: int) -> list[list[int]]:
    """Split token ids into consecutive chunks of at most ``chunk_len`` (the last may be shorter)."""
    return [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)]


def layer_inputs(hidden_states: tuple[torch.Tensor, ...], num_layers: int) -> torch.Tensor:
    """Stack the inputs of layers ``0..L-1`` from HF's ``hidden_states`` tuple: ``(B, L, T, H)``."""
    return torch.stack(hidden_states[:num_layers], dim=1)


@torch.no_grad()
def document_activations(model: PreTrainedModel, ids: list[int], prefix: list[int] = ()) -> torch.Tensor:
    """``(L, T, H)`` activations of one chunk, from one no-grad forward pass of the frozen model.

    ``prefix`` (the chat template's opening, see ``chat.context_prefix``) is run in front of the
    chunk so its activations match those the teacher sees in training; its positions are dropped.
    """
    prefix = list(prefix)
    device = next(model.parameters()).device
    out = model.model(
        input_ids=torch.tensor([prefix + list(ids)], device=device), output_hidden_states=True, use_cache=False
    )
    return layer_inputs(out.hidden_states, model.config.num_hidden_layers)[0, :, len(prefix) :]
