"""Held-out target cross-entropy under the adapters reconstruction can reach, next to the others.

For each held-out task's first 8 evaluation examples (no label smoothing, inputs cut to 96
tokens as in the fits), the mean per-token CE of the gold target with

- ``zero``: no adapter (the base model);
- ``library_mean``: the mean delta of all fitted training-task adapters (rank-concatenated);
- ``ridge_<encoder>``: with ``--coefficients`` (from ``library_neighbours.py``), the kernel
  ridge prediction from the description: a weighted sum of the library's deltas;
- ``recon``: the reconstruction-trained hypernetwork's adapter for the task's description;
- ``shipped``: the shipped (SFT-trained) hypernetwork's adapter for it;
- ``own_fit``: the task's own fitted adapter (``fit_library --split held``, fitted on other
  examples of the task): what one adapter of this shape can do.

    python -m research.library_ce --library runs/t2l-library --recon runs/t2l-recon/checkpoint \
        --out docs/results/library_ce.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyperlora_integrations.hypernets import checkpoint as ckpt
from hyperlora_integrations.lora import Adapter, concat
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_t2l
from hyperlora_integrations.training.library import FittedAdapter, load_library
from hyperlora_integrations.training.tasks import load_tasks, split


def weighted_adapter(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """The weighted sum of the deltas, exactly, as one adapter of the summed rank."""
    return concat([Adapter(a.A, a.B, scaling=a.scaling * w) for a, w in zip(adapters, weights)])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default="runs/t2l-library")
    p.add_argument("--recon", default="runs/t2l-recon/checkpoint")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--coefficients", default=None, help="ridge weights from library_neighbours.py --coefficients")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HyperLoRAModel.from_pretrained(d2l=None)
    loss_args = train_t2l.parse_args(["--max-input-tokens", "96"])
    _, held = split(load_tasks())
    fitted_held = load_library(args.library, "held")
    library = {n: a for n, (a, _) in load_library(args.library, "train").items()}
    mean = FittedAdapter.holding(weighted_adapter(list(library.values()), [1 / len(library)] * len(library)))
    coefficients = json.loads(Path(args.coefficients).read_text()) if args.coefficients else {}
    zero = FittedAdapter(fitted_held[held[0].name][0])  # B = 0: the base model
    recon = ckpt.load(args.recon)
    rows = {}
    with torch.no_grad():
        for task in held:
            exs = task.examples[: args.examples]
            desc = task.descriptions[0]
            nets = {
                "zero": (zero, recon.encoder(model)),
                "library_mean": (mean, recon.encoder(model)),
                "recon": (recon, recon.encoder(model)),
                "shipped": (model.t2l, model.t2l.encoder(model)),
                "own_fit": (FittedAdapter.holding(fitted_held[task.name][0]), recon.encoder(model)),
            }
            for enc_name, coef in coefficients.get(task.name, {}).items():
                mixed = weighted_adapter([library[n] for n in coef], list(coef.values()))
                nets[f"ridge_{enc_name}"] = (FittedAdapter.holding(mixed), recon.encoder(model))
            rows[task.name] = {
                name: float(
                    train_t2l.sft_loss(model, net, enc.encode(desc)[None].expand(len(exs), -1), exs, loss_args, 0.0)[0]
                )
                for name, (net, enc) in nets.items()
            }
            print(task.name, {k: round(v, 3) for k, v in rows[task.name].items()}, flush=True)
    average = {k: sum(r[k] for r in rows.values()) / len(rows) for k in next(iter(rows.values()))}
    print("average", {k: round(v, 3) for k, v in average.items()})
    if args.out:
        Path(args.out).write_text(json.dumps({"average": average, "tasks": rows, "args": vars(args)}, indent=1))
    return average


if __name__ == "__main__":
    main()
