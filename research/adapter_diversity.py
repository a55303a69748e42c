"""Diagnostic: how much do generated adapters differ between documents?

Internalizes 12 held-out passages (3 per source) with each checkpoint and compares the weight
deltas ``B @ A`` (all layers, flattened): their pairwise cosine similarity, and the share of
each delta's norm that is not the mean delta over the documents (the document-specific part).
An adapter that carries a document's content must differ from document to document.

    python -m research.adapter_diversity runs/d2l-shipped-450 hyperlora_integrations/checkpoints/d2l-smollm2-135m
"""

from __future__ import annotations

import json
import sys

import torch

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.training.data import d2l_eval_items


def main(checkpoints: list[str], out: str = "runs/adapter_diversity.json") -> dict:
    torch.set_num_threads(1)
    items = d2l_eval_items(per_source=3, seed=5)
    result = {}
    for ck in checkpoints:
        model = HyperLoRAModel.from_pretrained(d2l=ck, t2l=None)
        deltas = []
        for it in items:
            A, B = model.internalize(it.passage).folded()
            deltas.append(torch.einsum("lor,lri->loi", B["down_proj"].float(), A["down_proj"].float()).flatten())
        D = torch.stack(deltas)
        gram = D @ D.T  # a 12 x 12 Gram matrix, never the 12 x 12 x |delta| broadcast
        norms = gram.diag().sqrt()
        cos = gram / norms[:, None] / norms[None]
        off = cos[~torch.eye(len(D), dtype=torch.bool)]
        result[ck] = {
            "docs": len(items),
            "pairwise_cosine_mean": float(off.mean()),
            "pairwise_cosine_min": float(off.min()),
            "doc_specific_norm_share": float(((D - D.mean(0)).norm(dim=1) / norms).mean()),
        }
        print(ck, result[ck], flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/d2l-shipped-450", "hyperlora_integrations/checkpoints/d2l-smollm2-135m"])
