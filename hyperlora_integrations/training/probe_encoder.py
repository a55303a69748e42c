"""How well a description embedding separates tasks: the measurement behind the T2L encoder.

For 40 training tasks with at least three descriptions, the first description is the query and
the mean of the next two the key; reports nearest-task accuracy and the mean cosine to the own
task and to other tasks, for raw and standardised embeddings, at the given layers.

    python -m hyperlora_integrations.training.probe_encoder --layers 15 30
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from ..base_model import load_base_model
from ..encoders.description import DescriptionEncoder
from .tasks import load_tasks


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[15])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    base = load_base_model()
    tasks = [t for t in load_tasks().values() if len(t.descriptions) >= 3]
    random.Random(args.seed).shuffle(tasks)
    tasks = tasks[: args.tasks]
    results = []
    for layer in args.layers:
        enc = DescriptionEncoder(base.model, base.tokenizer, layer=layer)
        emb = torch.stack([enc.encode_many(t.descriptions[:3]) for t in tasks])  # (T, 3, H)
        for standardised in (False, True):
            x = emb.clone()
            if standardised:
                flat = x.reshape(-1, x.shape[-1])
                x = (x - flat.mean(0)) / flat.std(0).clamp_min(1e-6)
            x = F.normalize(x, dim=-1)
            sims = x[:, 0] @ x[:, 1:].mean(1).T
            off = ~torch.eye(len(tasks), dtype=torch.bool)
            row = {
                "layer": layer,
                "standardised": standardised,
                "nearest_task_accuracy": float((sims.argmax(1) == torch.arange(len(tasks))).float().mean()),
                "cosine_same": float(sims.diag().mean()),
                "cosine_other": float(sims[off].mean()),
            }
            print(row)
            results.append(row)
    return results


if __name__ == "__main__":
    main()
