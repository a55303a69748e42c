"""A step's rows as one prefix tree, so every distinct prefix runs through the model once.

Consolidation rows repeat themselves: each starts with the same chat-template prefix (about 30
tokens of SmolLM2's system prompt), rows of one kind share their instruction, and a short text's
recitation is drawn several times -- ``engine.by_length`` puts such equal-length rows in the same
batch. Measured on a 434-token text (`research/probe_consolidation_speed.py` rows, 30 steps x 4):
11,111 tokens padded batch by batch, 4,851 as prefix trees.

A tree is one sequence: a node per distinct (prefix, token), its position its depth, and an
attention mask that lets a node see exactly its ancestors. With the same weights every row's
logits are those of its own causal forward, so the loss (the mean over every row's target
tokens, a repeated row counted as often as it was drawn) and its gradient are unchanged; only
the work is. ``optimise`` checks that equality once per fit on the model at hand (a 4-D mask
is not honoured by every attention kernel) and otherwise uses right-padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Seq = tuple[list[int], list[int]]  # (prompt ids, target ids)
MAX_TREE_TOKENS = 4096  # the mask is N x N: beyond this, padded batches


@dataclass
class Packed:
    """Model inputs for a step's rows and where each target token's logits come out.

    ``at[r][i]`` indexes the flattened ``[batch * len(keep), vocab]`` logits: the row predicting
    target token ``i`` of row ``r``. ``origin[n]`` is a (row, position) holding node ``n``'s token,
    for gathering cached states (``frozen.FrozenPrefix``); None for padded batches.
    """

    ids: torch.Tensor
    keep: torch.Tensor
    at: list[torch.Tensor]
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    origin: list[tuple[int, int]] | None = None


def pad_right(rows: Sequence[list[int]], pad_id: int, device) -> torch.Tensor:
    """Token rows right-padded to the longest (no mask needed in a causal model: real tokens never
    see the pads after them)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids.to(device)


def padded(rows: Sequence[Seq], pad_id: int, device) -> Packed:
    """Right-padded rows; logits from the shortest prompt's last token on."""
    ids = pad_right([p + t for p, t in rows], pad_id, device)
    width = ids.shape[1]
    first = min(len(p) for p, _ in rows) - 1  # logits at position i predict token i + 1
    span = width - 1 - first
    at = [r * span + torch.arange(len(p) - 1 - first, len(p) - 1 - first + len(t)) for r, (p, t) in enumerate(rows)]
    return Packed(ids, torch.arange(first, width - 1, device=device), [a.to(device) for a in at])


def tree(rows: Sequence[Seq], device, dtype: torch.dtype) -> Packed | None:
    """The rows' prefix tree as one sequence, or None when it is too long for a dense mask."""
    children: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    depth: list[int] = []
    origin: list[tuple[int, int]] = []
    paths = []
    for r, (prompt, target) in enumerate(rows):
        node, path = -1, []
        for j, token in enumerate(prompt + target):
            nxt = children.get((node, token))
            if nxt is None:
                nxt = children[(node, token)] = len(tokens)
                tokens.append(token)
                depth.append(j)
                origin.append((r, j))
            path.append(nxt)
            node = nxt
        paths.append(path)
    n = len(tokens)
    if n > MAX_TREE_TOKENS:
        return None
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for path in paths:  # a node sees the nodes on its path up to itself: its ancestors
        idx = torch.tensor(path)
        lower = torch.ones(len(path), len(path), dtype=torch.bool).tril()
        allowed[idx.unsqueeze(1).expand_as(lower)[lower], idx.unsqueeze(0).expand_as(lower)[lower]] = True
    needed = sorted({path[j - 1] for path, (p, _) in zip(paths, rows, strict=True) for j in range(len(p), len(path))})
    slot = {node: k for k, node in enumerate(needed)}
    at = [
        torch.tensor([slot[path[j - 1]] for j in range(len(p), len(path))], device=device)
        for path, (p, _) in zip(paths, rows, strict=True)
    ]
    mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return Packed(
        ids=torch.tensor([tokens], device=device),
        keep=torch.tensor(needed, device=device),
        at=at,
        position_ids=torch.tensor([depth], device=device),
        attention_mask=mask[None, None].to(device),
        origin=origin,
    )
