"""Does a task's description predict its fitted adapter? Checked before training a hypernetwork on it.

For every held-out task fitted by ``fit_library --split held``, the relative squared error of
its weight delta (``||dW_pred - dW_task||^2 / ||dW_task||^2``, 1 = the zero adapter) under
predictions that need no hypernetwork:

- ``mean``: the mean delta of all training tasks' fitted adapters;
- ``nearest_<encoder>``: the training task whose description is most similar (cosine of
  standardised embeddings, the hypernetwork's input), and ``knn5_<encoder>``: a
  similarity-weighted mean of the five most similar;
- ``best``: the training task whose adapter is closest (an oracle, the floor for a single pick).

If ``nearest``/``knn`` do no better than ``mean``, a hypernetwork regressed onto the library can
only learn the mean for an unseen description. Mixtures are exact: a weighted sum of deltas is a
rank-concatenated adapter.

    python scripts/library_neighbours.py --library runs/t2l-library --out docs/results/library_neighbours.json
    python scripts/library_neighbours.py --weighted --out docs/results/library_neighbours_weighted.json

``--weighted`` measures the errors on the deltas' outputs for real activations (the inputs'
second moments over 2 examples of each library task), not on the raw weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyperlora_integrations.encoders.description import description_encoder
from hyperlora_integrations.lora import Adapter, delta_sq_distance
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_t2l
from hyperlora_integrations.training.fit_library import gram_root, library_gram, load_library
from hyperlora_integrations.training.tasks import load_tasks


def stack(adapters: list[Adapter], weights: torch.Tensor) -> tuple[dict, dict]:
    """The weighted sum of deltas as one rank-concatenated (A, B) per module."""
    mods = adapters[0].A
    A = {m: torch.cat([a.A[m] for a in adapters], dim=1) for m in mods}
    weights = weights.to(adapters[0].B[next(iter(mods))].dtype)
    B = {m: torch.cat([w * a.B[m] * a.scaling for a, w in zip(adapters, weights)], dim=2) for m in mods}
    return A, B


def rel_error(A: dict, B: dict, target: Adapter, proj: dict | None) -> float:
    err = ref = 0.0
    for m in target.A:
        tb = target.B[m] * target.scaling
        d, r = delta_sq_distance(A[m], B[m], target.A[m], tb)
        if proj is not None:
            root, tail = proj[m]
            dw, rw = delta_sq_distance(A[m] @ root, B[m], target.A[m] @ root, tb)
            d, r = dw + tail * d, rw + tail * r
        err, ref = err + float(d.sum()), ref + float(r.sum())
    return err / ref


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default="runs/t2l-library")
    p.add_argument("--weighted", action="store_true", help="errors on real activations (the library's gram)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    train, held = load_library(args.library, "train"), load_library(args.library, "held")
    names = list(train)
    lib = [train[n][0] for n in names]
    tasks = load_tasks()
    model = HyperLoRAModel.from_pretrained(d2l=None, t2l=None)
    sims = {}
    for enc_name in ("base-mean", "minilm"):
        enc = description_encoder(enc_name, model.model, model.tokenizer)
        keys = torch.stack([enc.encode_many(tasks[n].descriptions).mean(0) for n in names])
        mean, std = keys.mean(0), keys.std(0).clamp_min(1e-6)
        keys = torch.nn.functional.normalize((keys - mean) / std, dim=-1)
        queries = torch.stack([enc.encode(tasks[h].descriptions[0]) for h in held])
        sims[enc_name] = torch.nn.functional.normalize((queries - mean) / std, dim=-1) @ keys.T
    proj = None
    if args.weighted:
        loss_args = train_t2l.parse_args(["--max-input-tokens", "96"])  # as the fits saw them
        gram = library_gram(Path(args.library), model, [tasks[n] for n in names], ["down_proj"], loss_args)
        proj = {m: gram_root(g, k=gram[m].shape[-1]) for m, g in gram.items()}  # exact
    uniform = torch.full((len(lib),), 1 / len(lib))
    mean_A, mean_B = stack(lib, uniform)
    rows = {}
    for i, h in enumerate(held):
        target = held[h][0]
        singles = [rel_error(a.A, {m: b * a.scaling for m, b in a.B.items()}, target, proj) for a in lib]
        row = {
            "mean": rel_error(mean_A, mean_B, target, proj),
            "best": min(singles),
            "best_task": names[singles.index(min(singles))],
        }
        for enc_name, s in sims.items():
            top = s[i].topk(5)
            row[f"nearest_{enc_name}"] = singles[int(top.indices[0])]
            row[f"nearest_task_{enc_name}"] = names[int(top.indices[0])]
            w = torch.softmax(top.values / 0.1, 0)
            row[f"knn5_{enc_name}"] = rel_error(*stack([lib[int(j)] for j in top.indices], w), target, proj)
        rows[h] = row
    keys = [k for k in next(iter(rows.values())) if not k.endswith("task") and "task_" not in k]
    summary = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    summary["library_tasks"] = len(lib)
    print(json.dumps({"summary": summary, "tasks": rows}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "tasks": rows}, indent=1))
    return summary


if __name__ == "__main__":
    main()
