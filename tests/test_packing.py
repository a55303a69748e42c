"""Prefix-tree packing (consolidation/packing.py): the same logits, loss and fit as padded
batches with less work, and a fall-back to padded batches where the model disagrees."""

from __future__ import annotations

import pytest
import torch

from hyperlora_integrations.consolidation import ConsolidationConfig, packing
from hyperlora_integrations.consolidation.trainer import fit

DOC = (
    "The Varnholt Observatory was founded in 1873 by Orvella Quenby in the town of Haskmere. "
    "Its first telescope, named Bright Ember, cost 347 guilders."
)


def _rows(model) -> list[tuple[list[int], list[int]]]:
    def row(prompt: str, target: str) -> tuple[list[int], list[int]]:
        ids = model.encode([{"role": "user", "content": prompt}])
        return ids, model.tokenizer.encode(target, add_special_tokens=False)

    recite = row("Tell me what the document says.", DOC)
    return [
        recite,
        row("Fill in the blank: founded in ____ by Orvella Quenby.", "1873"),
        recite,  # drawn twice in one step: its loss counts twice, its tokens run once
        row("Fill in the blank: cost ____ guilders.", "347"),
    ]


def _leak_rows_into_each_other(monkeypatch) -> None:
    """Trees whose mask lets every node see every other: what a kernel ignoring the mask computes."""
    real = packing.tree

    def leaky(*args, **kwargs):
        out = real(*args, **kwargs)
        out.attention_mask = torch.zeros_like(out.attention_mask)
        return out

    monkeypatch.setattr(packing, "tree", leaky)


def test_tree_logits_equal_each_rows_own_forward(tiny_model):
    model = tiny_model
    rows = _rows(model)
    tree = packing.tree(rows, model.base.device, model.base.dtype)
    assert tree is not None
    assert tree.ids.shape[1] < sum(len(p) + len(t) for p, t in rows) - len(rows[0][0]) - len(rows[0][1])
    with torch.no_grad():
        out = model.model(
            input_ids=tree.ids,
            attention_mask=tree.attention_mask,
            position_ids=tree.position_ids,
            logits_to_keep=tree.keep,
        ).logits[0]
        for (prompt, target), at in zip(rows, tree.at, strict=True):
            alone = model.model(input_ids=torch.tensor([prompt + target])).logits[0]
            expected = alone[len(prompt) - 1 : len(prompt) + len(target) - 1]
            torch.testing.assert_close(out[at], expected, atol=1e-4, rtol=1e-4)
    flat = packing.padded(rows, 0, model.base.device)
    assert [len(a) for a in flat.at] == [len(a) for a in tree.at] == [len(t) for _, t in rows]


@pytest.mark.parametrize("layers", [None, 1])
def test_fit_on_trees_matches_fit_on_padded_batches(fresh_tiny_model, monkeypatch, layers):
    model = fresh_tiny_model
    rows = _rows(model)
    config = ConsolidationConfig(steps=6, batch_size=4, lr=2e-2, layers=layers)
    packed = fit(model, rows, config, seed=3)
    monkeypatch.setattr(packing, "tree", lambda *a, **k: None)  # e.g. a batch too long for a dense mask
    plain = fit(model, rows, config, seed=3)
    assert packed.packed and packed.cached == (layers is not None) and plain.losses[-1] < plain.losses[0]
    assert not fit(model, rows, config.model_copy(update={"packing": False, "steps": 1}), seed=3).packed
    torch.testing.assert_close(torch.tensor(packed.losses), torch.tensor(plain.losses), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed.B["down_proj"], plain.B["down_proj"], atol=1e-4, rtol=1e-3)


def test_a_model_that_disagrees_with_the_tree_trains_on_padded_batches(fresh_tiny_model, monkeypatch):
    """The once-per-fit check compares tree and padded logits: a mask the model would not honour
    (here: one that lets every node see every other) is caught and the fit uses padded batches."""
    model = fresh_tiny_model
    _leak_rows_into_each_other(monkeypatch)
    result = fit(model, _rows(model), ConsolidationConfig(steps=2, batch_size=4), seed=0)
    assert not result.packed and result.steps == 2


def test_bf16_models_train_on_trees_and_a_leaky_mask_is_still_caught(monkeypatch):
    """In bf16 two batchings of the same rows differ by rounding (about 2 % of the largest logit
    on SmolLM2), so the check's tolerance scales with the dtype; a mask that leaks rows into each
    other still fails it."""
    from hyperlora_integrations.consolidation.trainer import _tree_is_exact
    from hyperlora_integrations.testing import tiny_hyperlora_model

    model = tiny_hyperlora_model(seed=5)
    model.model.to(torch.bfloat16)
    rows = _rows(model)
    assert _tree_is_exact(model, rows, 0, None)
    _leak_rows_into_each_other(monkeypatch)
    assert not _tree_is_exact(model, rows, 0, None)
