"""The prompt prefix every training turn shares, run once per step instead of once per row.

Every consolidation turn is chat-encoded, so each row starts with the same tokens: the chat
template's system block and the user header (about 30 tokens for SmolLM2, which inserts a default
system prompt). With a batch of 4 rows of ~90 tokens that prefix is a third of a step's work.
The adapter being trained changes the prefix's keys and values too, so they cannot be computed
once per fit -- but they are the same for every row of a step: run the prefix once (batch 1),
repeat its cache over the rows, run the rest. Gradients flow through the repeated cache, so the
step computes the same loss and gradient as the plain batch.

Like the frozen-layer cache, it is checked against the model's own forward once per fit and left
off where it differs (a model whose cache does not support it, or a numerical mismatch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_SHARED_TOKENS = 8  # below this the second call costs more than it saves


def shared_length(sequences: Sequence[tuple[list[int], list[int]]]) -> int:
    """Tokens every prompt starts with, leaving each prompt's last token out of the prefix
    (its logits predict the first target token, so it must be in the second call)."""
    prompts = [p for p, _ in sequences]
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_TOKENS else 0


def prefix_logits(lm, ids: torch.Tensor, keep: torch.Tensor, shared: int) -> torch.Tensor:
    """Logits at positions ``keep`` of right-padded ``ids`` whose first ``shared`` tokens are
    the same in every row, with the prefix computed once."""
    head = lm(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1)
    cache = head.past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    return lm(input_ids=ids[:, shared:], past_key_values=cache, logits_to_keep=keep - shared).logits


def usable(lm, ids: torch.Tensor, keep: torch.Tensor, shared: int) -> bool:
    """Whether the split forward gives the model's own logits on this batch (checked once per fit)."""
    if shared <= 0 or ids.shape[0] < 2 or int(keep.min()) < shared:
        return False
    with torch.no_grad():
        try:
            split = prefix_logits(lm, ids, keep, shared)
        except Exception:  # a model or cache class without batch_repeat_interleave
            return False
        full = lm(input_ids=ids, logits_to_keep=keep).logits
    return split.shape == full.shape and torch.allclose(split.float(), full.float(), atol=1e-3, rtol=1e-3)
