"""Task metrics of the best description-based adapter we can build in closed form.

``library_neighbours.py --coefficients`` writes, for each held-out task, the kernel-ridge weights
over the fitted training adapters that its description predicts. This scores those predicted
adapters with ``eval_t2l.run_task`` on the held-out tasks, under its condition names:

- ``a_base``, ``b_desc``: the base model with the input, and with the description too;
- ``c_adapter`` / ``d_adapter_desc``: the ridge adapter of the task's own description;
- ``c_mismatched``: the ridge adapter of the next held-out task's description (the pairing of
  ``hyperlora eval t2l``);
- ``c_random``: the shipped hypernetwork's adapter for the task's description, for a paired
  comparison with it.

A ridge prediction is a weighted sum of hundreds of rank-8 deltas; it is cut to ``--rank`` by
``lora.compress`` (truncated SVD, the retained energy is reported) so that scoring it costs
about what a generated adapter does. The measured run (docs/text-to-lora.md):

    python -m research.ridge_task_metric --coefficients runs/ridge_coef_ps.json --encoder minilm \\
        --mc-examples 100 --gen-examples 30 --out docs/results/ridge_task_metric.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from hyperlora_integrations.lora.compress import compress, retained_energy
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training.eval_t2l import add_eval_args, difference, report, run_held_out
from hyperlora_integrations.training.library import load_library
from hyperlora_integrations.training.tasks import load_tasks, split
from research.library_ce import weighted_adapter


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default="runs/t2l-library")
    p.add_argument("--coefficients", required=True, help="ridge weights from library_neighbours.py --coefficients")
    p.add_argument("--encoder", default="minilm", help="whose ridge weights: minilm or base-mean")
    p.add_argument("--rank", type=int, default=64, help="rank the predicted adapters are cut to")
    add_eval_args(p, mc_examples=100, gen_examples=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = HyperLoRAModel.from_pretrained(d2l=None)
    _, held = split(load_tasks(seed=args.seed))
    library = {n: a for n, (a, _) in load_library(args.library, "train").items()}
    coefficients = json.loads(Path(args.coefficients).read_text())

    ridge, energy = {}, {}
    for task in held:
        coef = coefficients[task.name][args.encoder]
        full = weighted_adapter([library[n] for n in coef], list(coef.values()))
        energy[task.name] = retained_energy(full, args.rank)
        ridge[task.name] = compress(full, args.rank)

    def adapters_for(task, other):
        shipped = model.generate_skill(task.descriptions[0])
        return {"c_adapter": ridge[task.name], "c_mismatched": ridge[other.name], "c_random": shipped}

    per_task = run_held_out(model, held, args, rng, adapters_for, desc="eval ridge adapters")

    return report(
        per_task,
        args.out,
        quiet=("retained_energy",),
        c_minus_b=difference(per_task, "c_adapter", "b_desc"),
        d_minus_b=difference(per_task, "d_adapter_desc", "b_desc"),
        matched_minus_mismatched=difference(per_task, "c_adapter", "c_mismatched"),
        ridge_minus_shipped=difference(per_task, "c_adapter", "c_random"),
        retained_energy=energy,
        conditions="c_adapter/d_adapter_desc: ridge (own description); c_mismatched: ridge (next task's); "
        "c_random: shipped T2L",
        args=vars(args),
    )


if __name__ == "__main__":
    main()
