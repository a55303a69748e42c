"""Does a task's description predict its fitted adapter? Checked before training a hypernetwork on it.

For every held-out task fitted by ``fit_library --split held``, the relative squared error of
its weight delta (``||dW_pred - dW_task||^2 / ||dW_task||^2``, 1 = the zero adapter) under
predictions that need no hypernetwork:

- ``mean``: the mean delta of the training tasks' fitted adapters; ``kind_mean``: the same over
  the training tasks of the held-out task's kind (multiple choice or generation), a measure
  of how much of an adapter is answer format;
- ``nearest_<encoder>``: the training task whose description is most similar (cosine of
  standardised embeddings, the hypernetwork's input), and ``knn5_<encoder>``: a
  similarity-weighted mean of the five most similar;
- ``best``: the training task whose adapter is closest (an oracle, the floor for a single pick).

If ``nearest``/``knn`` do no better than ``mean``, a hypernetwork regressed onto the library can
only learn the mean for an unseen description. Mixtures are exact: a weighted sum of deltas is a
rank-concatenated adapter. ``--sizes`` repeats the test on random sub-libraries, to see whether
more training tasks make descriptions more predictive, and plots it.

    python scripts/library_neighbours.py --weighted --out docs/results/library_neighbours_weighted.json
    python scripts/library_neighbours.py --out docs/results/library_neighbours.json

``--weighted`` measures the errors on the deltas' outputs for real activations (the inputs'
second moments over 2 examples of each library task, ``fit_library.library_gram``), not on the
raw weights: every A is mapped once by the exact root of those moments, after which the plain
distance is the weighted one.
"""

from __future__ import annotations

import argparse
import json
import random
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperlora_integrations.encoders.description import description_encoder
from hyperlora_integrations.lora import Adapter, concat, delta_sq_distance
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_t2l
from hyperlora_integrations.training.fit_library import gram_root, library_gram, load_library
from hyperlora_integrations.training.tasks import load_tasks

ENCODERS = ("base-mean", "minilm")


def mapped(adapter: Adapter, root: dict | None) -> Adapter:
    """``adapter`` with A mapped by the activation root, when weighting: the plain delta distance
    of mapped adapters is the activation-weighted one of the originals."""
    if root is None:
        return adapter
    return Adapter({m: a @ root[m] for m, a in adapter.A.items()}, adapter.B, scaling=adapter.scaling)


def mix(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """The weighted sum of deltas, exactly: a rank-concatenated adapter."""
    return concat([Adapter(a.A, a.B, scaling=a.scaling * w) for a, w in zip(adapters, weights)])


def rel_error(pred: Adapter, target: Adapter) -> float:
    (pa, pb), (ta, tb) = pred.folded(), target.folded()
    err = ref = 0.0
    for m in ta:
        d, r = delta_sq_distance(pa[m], pb[m], ta[m], tb[m])
        err, ref = err + float(d.sum()), ref + float(r.sum())
    return err / ref


def neighbour_test(idx, names, lib, held, keys, queries, singles, kinds) -> dict:
    """Per held-out task, the errors of the predictions from the library tasks ``idx``.

    ``kinds``: task name -> "mc" / "gen", for the library and the held-out tasks."""
    mean = mix([lib[j] for j in idx], [1 / len(idx)] * len(idx))
    by_kind = {}
    for kind in {kinds[h] for h in held}:
        same = [j for j in idx if kinds[names[j]] == kind]
        by_kind[kind] = mix([lib[j] for j in same], [1 / len(same)] * len(same))
    rows = {}
    for i, (h, target) in enumerate(held.items()):
        own = [singles[i][j] for j in idx]
        row = {"mean": rel_error(mean, target), "kind_mean": rel_error(by_kind[kinds[h]], target)}
        row |= {"best": min(own), "best_task": names[idx[own.index(min(own))]]}
        for enc in ENCODERS:
            k = keys[enc][idx]
            mu, sd = k.mean(0), k.std(0).clamp_min(1e-6)  # standardised as the hypernetwork's input is
            sims = F.normalize((queries[enc][i] - mu) / sd, dim=-1) @ F.normalize((k - mu) / sd, dim=-1).T
            top = sims.topk(min(5, len(idx)))
            near = [idx[int(j)] for j in top.indices]
            row[f"nearest_{enc}"] = singles[i][near[0]]
            row[f"nearest_task_{enc}"] = names[near[0]]
            w = torch.softmax(top.values / 0.1, 0).tolist()
            row[f"knn5_{enc}"] = rel_error(mix([lib[j] for j in near], w), target)
        rows[h] = row
    return rows


def average(rows: dict) -> dict:
    first = next(iter(rows.values()))
    return {k: sum(r[k] for r in rows.values()) / len(rows) for k, v in first.items() if isinstance(v, float)}


def plot(curve: dict, path: Path, weighted: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(s) for s in curve)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {
        "mean": "mean of the library",
        "kind_mean": "mean of the library's tasks of the same kind",
        "best": "closest library adapter (oracle)",
        "knn5_minilm": "5 nearest descriptions (MiniLM)",
        "knn5_base-mean": "5 nearest descriptions (base model)",
        "nearest_minilm": "nearest description (MiniLM)",
    }
    for key, label in labels.items():
        ax.plot(sizes, [curve[str(s)][key] for s in sizes], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training tasks in the library")
    ax.set_ylabel("relative error of held-out deltas" + (" (on activations)" if weighted else ""), fontsize=9)
    ax.set_title("Do descriptions predict fitted adapters? (12 held-out tasks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default="runs/t2l-library")
    p.add_argument("--weighted", action="store_true", help="errors on real activations (the library's gram)")
    p.add_argument("--sizes", default="", help="comma-separated sub-library sizes for the curve, e.g. 23,46,93")
    p.add_argument("--repeats", type=int, default=3, help="random sub-libraries per size")
    p.add_argument("--out", default=None, help="JSON; with --sizes also a PNG next to it")
    args = p.parse_args(argv)
    train, held_lib = load_library(args.library, "train"), load_library(args.library, "held")
    names = list(train)
    tasks = load_tasks(extended=True)  # a library may hold extended tasks
    model = HyperLoRAModel.from_pretrained(d2l=None, t2l=None)
    keys, queries = {}, {}
    for enc_name in ENCODERS:
        enc = description_encoder(enc_name, model.model, model.tokenizer)
        keys[enc_name] = torch.stack([enc.encode_many(tasks[n].descriptions).mean(0) for n in names])
        queries[enc_name] = torch.stack([enc.encode(tasks[h].descriptions[0]) for h in held_lib])
    root = None
    if args.weighted:
        loss_args = train_t2l.parse_args(["--max-input-tokens", "96"])  # as the fits saw them
        gram = library_gram(Path(args.library), model, [tasks[n] for n in names], ["down_proj"], loss_args)
        root = {m: gram_root(g, k=g.shape[-1])[0] for m, g in gram.items()}  # full rank: exact
    lib = [mapped(train[n][0], root) for n in names]
    held = {h: mapped(a, root) for h, (a, _) in held_lib.items()}
    singles = [[rel_error(a, target) for a in lib] for target in held.values()]
    kinds = {n: info["kind"] for split_lib in (train, held_lib) for n, (_, info) in split_lib.items()}
    test = partial(
        neighbour_test, names=names, lib=lib, held=held, keys=keys, queries=queries, singles=singles, kinds=kinds
    )

    rows = test(list(range(len(names))))
    result = {"summary": {**average(rows), "library_tasks": len(names)}, "tasks": rows}
    default = set(load_tasks())  # the task set without --extended-tasks
    if not set(names) <= default:  # the same test on the default tasks alone, under the same weighting
        idx = [j for j, n in enumerate(names) if n in default]
        result["default_tasks"] = {**average(test(idx)), "library_tasks": len(idx)}
    if args.sizes:
        rng = random.Random(0)
        curve = {str(len(names)): result["summary"]}
        for size in (int(s) for s in args.sizes.split(",")):
            runs = [average(test(sorted(rng.sample(range(len(names)), size)))) for _ in range(args.repeats)]
            curve[str(size)] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        result["by_library_size"] = curve
    print(json.dumps({k: v for k, v in result.items() if k != "tasks"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        if args.sizes:
            plot(result["by_library_size"], Path(args.out).with_suffix(".png"), args.weighted)
    return result


if __name__ == "__main__":
    main()
