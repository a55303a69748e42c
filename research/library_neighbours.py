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
- ``ridge_<encoder>``: kernel ridge regression of the deltas on the description features with
  the library mean as intercept, lambda chosen by leave-one-group-out on the library (subtasks
  of one BIG-bench parent, and the MMLU subjects, form a group): the best a hypernetwork with a
  linear head on these features could do, in closed form;
- ``best``: the training task whose adapter is closest (an oracle, the floor for a single pick).

If none of the description-based predictions does better than ``mean``, a hypernetwork
regressed onto the library can only learn the mean for an unseen description. Every
prediction is a weighted sum of library deltas, so all errors come exactly from one matrix of
inner products of the deltas (``lora.delta_inner_matrix``). ``--sizes`` repeats the test on random sub-libraries, to see whether
more training tasks make descriptions more predictive, and plots it.

    python -m research.library_neighbours --weighted --out docs/results/library_neighbours_weighted.json
    python -m research.library_neighbours --out docs/results/library_neighbours.json

``--weighted`` measures the errors on the deltas' outputs for real activations (the inputs'
second moments over 2 examples of each library task, ``training.library.library_gram``), not on the
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
from hyperlora_integrations.lora import Adapter, delta_inner_matrix
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_t2l
from hyperlora_integrations.training.library import described_tasks, gram_root, library_gram, load_library
from hyperlora_integrations.training.tasks import load_tasks

ENCODERS = ("base-mean", "minilm")
LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def stacked(adapters: list[Adapter], root: dict | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, A (N, L, r, d_in) and B (N, L, d_out, r) with the scaling folded into B and,
    when weighting, A mapped by the activation root: the plain inner product of mapped deltas is
    the activation-weighted one of the originals."""
    folded = [a.folded() for a in adapters]
    out = {}
    for m in folded[0][0]:
        a = torch.stack([fa[m] for fa, _ in folded])
        if root is not None:  # one (N r x d) @ (d x d) product per layer: `a @ root` would expand root N times
            n, layers, r, d = a.shape
            a = (a.transpose(0, 1).reshape(layers, n * r, d) @ root[m]).reshape(layers, n, r, -1).transpose(0, 1)
        out[m] = (a, torch.stack([fb[m] for _, fb in folded]))
    return out


def group_of(name: str) -> str:
    """Tasks that are near-copies of each other (subtasks of one BIG-bench parent, MMLU
    subjects, the prompt templates of one dataset family) share a group; a held-out task is never in a
    training task's group."""
    if name.startswith("ps/"):
        return "/".join(name.split("/")[:2])
    if name.startswith("family/"):  # research/consolidated_library: one entry per paraphrase
        return name.split("#")[0]
    return name if name.startswith("ni/") or "/" not in name else name.split("/")[0]


def errors(coef: torch.Tensor, g: torch.Tensor, col: torch.Tensor, tt: torch.Tensor) -> float:
    """Relative squared error of the library mixture ``coef`` against a target, from the library's
    inner products ``g``, theirs with the target ``col`` and the target's own ``tt``."""
    c = coef.double()
    return float((c @ g @ c - 2 * c @ col + tt) / tt)


def ridge(kernel: torch.Tensor, kq: torch.Tensor, lam: float) -> torch.Tensor:
    """Kernel ridge regression of the deltas on the description features, with the library mean
    as intercept: the prediction's coefficients over the library (a linear map from description
    to adapter, fitted in closed form: what a hypernetwork with a linear head could learn).
    ``kernel``: the library features' inner products; ``kq``: theirs with the query's."""
    n = kernel.shape[0]
    alpha = torch.linalg.solve(kernel + lam * torch.eye(n, dtype=kernel.dtype), kq)
    return alpha + (1 - alpha.sum()) / n


def logo_error(kernel: torch.Tensor, g: torch.Tensor, groups: list[str], lam: float) -> float:
    """Leave-one-group-out relative error of ``ridge`` on the library itself (closed form per
    group), so lambda is chosen without looking at held-out tasks. The intercept (the library
    mean) is kept fixed, so a left-out group still counts in it: 1/n of a leak, for choosing
    lambda only."""
    n, dtype = kernel.shape[0], kernel.dtype
    hat = kernel @ torch.linalg.inv(kernel + lam * torch.eye(n, dtype=dtype))
    centre = torch.eye(n, dtype=dtype) - 1.0 / n
    resid = (torch.eye(n, dtype=dtype) - hat) @ centre  # in-sample residual coefficients
    total = 0.0
    for grp in sorted(set(groups)):
        rows = [i for i, x in enumerate(groups) if x == grp]
        loo = torch.linalg.solve(torch.eye(len(rows), dtype=dtype) - hat[rows][:, rows], resid[rows])
        total += float((torch.einsum("in,nm,im->i", loo, g, loo) / g.diagonal()[rows]).sum())
    return total / n


def neighbour_test(idx, names, gram, held_idx, feats, kinds, coefficients: dict | None = None) -> dict:
    """Per held-out task, the errors of the predictions from the library tasks ``idx``.

    ``gram``: inner products of all deltas (library first, then held-out tasks, at
    ``held_idx``); ``feats[enc]``: description embeddings (library and held-out rows alike);
    ``kinds``: "mc" / "gen" per task name. ``coefficients``, when given, receives the ridge
    prediction's weight per library task, per held-out task and encoder."""
    n = len(idx)
    mean = torch.full((n,), 1.0 / n, dtype=torch.float64)
    g = gram[idx][:, idx]
    phis = {}
    for enc in ENCODERS:  # standardised with this library's statistics, as the hypernetwork's input is
        k = feats[enc][idx]
        mu, sd = k.mean(0), k.std(0).clamp_min(1e-6)
        phis[enc] = F.normalize((feats[enc] - mu) / sd, dim=-1).double()
    rows = {}
    groups = [group_of(names[j]) for j in idx]
    kernels = {enc: phis[enc][idx] @ phis[enc][idx].T for enc in ENCODERS}
    lams = {enc: min(LAMBDAS, key=lambda lam: logo_error(kernels[enc], g, groups, lam)) for enc in ENCODERS}
    for h, t in held_idx.items():
        col, tt = gram[idx, t], gram[t, t]
        single = ((g.diagonal() - 2 * col + tt) / tt).tolist()
        same = torch.tensor([kinds[names[j]] == kinds[h] for j in idx], dtype=torch.float64)
        row = {"mean": errors(mean, g, col, tt), "kind_mean": errors(same / same.sum(), g, col, tt)}
        row |= {"best": min(single), "best_task": names[idx[single.index(min(single))]]}
        for enc in ENCODERS:
            kq = phis[enc][idx] @ phis[enc][t]
            top = kq.topk(min(5, n))
            row[f"nearest_{enc}"] = single[int(top.indices[0])]
            row[f"nearest_task_{enc}"] = names[idx[int(top.indices[0])]]
            knn = torch.zeros(n, dtype=torch.float64)
            knn[top.indices] = torch.softmax(top.values / 0.1, 0)
            row[f"knn5_{enc}"] = errors(knn, g, col, tt)
            lam = lams[enc]
            coef = ridge(kernels[enc], kq, lam)
            row[f"ridge_{enc}"] = errors(coef, g, col, tt)
            if coefficients is not None:
                coefficients.setdefault(h, {})[enc] = dict(zip((names[j] for j in idx), coef.tolist()))
            row[f"ridge_lambda_{enc}"] = lam
            for other in LAMBDAS:  # the whole path, for the record (hindsight, not a result)
                row[f"ridge_{enc}@{other:g}"] = errors(ridge(kernels[enc], kq, other), g, col, tt)
        rows[h] = row
    return rows


def paraphrase_test(names: list[str], gram: torch.Tensor) -> dict:
    """Is an entry closer to the other paraphrases of its own task than to the other tasks'?

    Per entry, the relative error of the mean of its group's other entries (``paraphrase``)
    and of the mean of the other groups' entries (``others``): if the adapter carries its task
    rather than the run's noise, ``paraphrase`` is far below ``others``."""
    groups = [group_of(n) for n in names]
    own, other = [], []
    for i, grp in enumerate(groups):
        same = [j for j, g in enumerate(groups) if g == grp and j != i]
        rest = [j for j, g in enumerate(groups) if g != grp]
        if not same or not rest:
            continue
        for picked, into in ((same, own), (rest, other)):
            coef = torch.zeros(len(names), dtype=torch.float64)
            coef[picked] = 1.0 / len(picked)
            into.append(errors(coef, gram, gram[:, i], gram[i, i]))
    return {
        "entries": len(own),
        "paraphrase": sum(own) / max(len(own), 1),
        "others": sum(other) / max(len(other), 1),
        "paraphrase_better": sum(a < b for a, b in zip(own, other)),
    }


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
        "ridge_base-mean": "ridge on descriptions (base model)",
        "ridge_minilm": "ridge on descriptions (MiniLM)",
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
    p.add_argument("--coefficients", default=None, help="JSON: the ridge predictions' weights over the library")
    args = p.parse_args(argv)
    train, held_lib = load_library(args.library, "train"), load_library(args.library, "held")
    names = list(train)
    has_templates = any(n.startswith("ps/") for n in names)
    tasks = load_tasks(extended=True, templates=has_templates)  # whatever task set the library holds
    for lib in (train, held_lib):  # entries that describe themselves (research/consolidated_library)
        tasks.update({t.name: t for t in described_tasks(lib, set(tasks))})
    model = HyperLoRAModel.from_pretrained(d2l=None, t2l=None)
    held_names = list(held_lib)
    everything = [train[n][0] for n in names] + [held_lib[h][0] for h in held_names]
    feats = {}
    for enc_name in ENCODERS:
        enc = description_encoder(enc_name, model.model, model.tokenizer)
        keys = torch.stack([enc.encode_many(tasks[n].descriptions).mean(0) for n in names])
        queries = torch.stack([enc.encode(tasks[h].descriptions[0]) for h in held_names])
        feats[enc_name] = torch.cat([keys, queries])
    root = None
    if args.weighted:
        loss_args = train_t2l.parse_args(["--max-input-tokens", "96"])  # as the fits saw them
        gram = library_gram(Path(args.library), model, [tasks[n] for n in names], ["down_proj"], loss_args)
        root = {m: gram_root(g, k=g.shape[-1])[0] for m, g in gram.items()}  # full rank: exact
    inner = sum(delta_inner_matrix(a, b) for a, b in stacked(everything, root).values())
    held_idx = {h: len(names) + i for i, h in enumerate(held_names)}
    kinds = {n: info["kind"] for split_lib in (train, held_lib) for n, (_, info) in split_lib.items()}
    test = partial(neighbour_test, names=names, gram=inner, held_idx=held_idx, feats=feats, kinds=kinds)

    coefficients = {}
    rows = test(list(range(len(names))), coefficients=coefficients)
    if args.coefficients:  # the ridge predictions as library weights, for research/library_ce.py
        Path(args.coefficients).write_text(json.dumps(coefficients))
    result = {"summary": {**average(rows), "library_tasks": len(names)}, "tasks": rows}
    if any("#" in n for n in names):
        result["paraphrases"] = paraphrase_test(names, inner[: len(names), : len(names)])
    default = set(load_tasks())  # the task set without --extended-tasks
    idx = [j for j, n in enumerate(names) if n in default]
    if idx and len(idx) < len(names):  # the same test on the default tasks alone, under the same weighting
        result["default_tasks"] = {**average(test(idx)), "library_tasks": len(idx)}
    if has_templates:  # and without the promptsource-template tasks
        idx = [j for j, n in enumerate(names) if not n.startswith("ps/")]
        result["without_templates"] = {**average(test(idx)), "library_tasks": len(idx)}
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
