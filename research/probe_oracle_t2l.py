"""The Text-to-LoRA counterpart of ``probe_oracle``: what a per-task fitted adapter of the same shape scores.

For each held-out task, one LoRA of exactly the generated shape is fitted by gradient descent
with the training loss (``train_t2l.sft_loss``) on examples the evaluation does not use, then
scored by ``eval_t2l.run_task`` under its condition names:

- ``a_base``, ``b_desc``: the base model with the input, and with the description too;
- ``c_adapter`` / ``d_adapter_desc``: the task's own fitted adapter, without / with the description;
- ``c_mismatched``: the next held-out task's fitted adapter;
- ``c_random``: the shipped hypernetwork's adapter for the task's description, for reference.

Had even this fit failed to beat (b), the adapter's shape or the loss would be the limit; where
it does, what remains is the hypernetwork's. The measured run (docs/text-to-lora.md):

    python -m research.probe_oracle_t2l --steps 25 --batch 4 --mc-examples 20 \
        --gen-examples 10 --threads 2 --out docs/results/probe_oracle_t2l.json
"""

from __future__ import annotations

import argparse
import random

import torch
from tqdm.auto import tqdm

from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_t2l
from hyperlora_integrations.training.eval_t2l import add_eval_args, difference, report, run_held_out
from hyperlora_integrations.training.tasks import load_tasks, split
from research.fit_library import fit_task


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_eval_args(p)
    p.add_argument("--fit-examples", type=int, default=64, help="examples per task the fit may use (never evaluated)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = HyperLoRAModel.from_pretrained(d2l=None)
    # The training loop's SFT settings, so the fit sees what the hypernetwork is trained on.
    fit_args = train_t2l.parse_args([])
    _, held = split(load_tasks(seed=args.seed))
    n_eval = {t.name: args.mc_examples if t.kind == "mc" else args.gen_examples for t in held}

    fitted, generated, fit_loss = {}, {}, {}
    for task in tqdm(held, desc="fit per-task adapters", unit="task"):
        n = n_eval[task.name]
        pool = task.examples[n : n + args.fit_examples]
        generated[task.name] = model.generate_skill(task.descriptions[0])
        fitted[task.name], losses = fit_task(
            model,
            generated[task.name],
            pool,
            rng,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            max_input_tokens=fit_args.max_input_tokens,
        )
        fit_loss[task.name] = {**losses, "examples": len(pool)}

    def adapters_for(task, other):
        return {"c_adapter": fitted[task.name], "c_mismatched": fitted[other.name], "c_random": generated[task.name]}

    per_task = run_held_out(model, held, args, rng, adapters_for, desc="eval fitted adapters")

    return report(
        per_task,
        args.out,
        quiet=("fit_loss",),
        fit_loss=fit_loss,
        fitted_minus_desc=difference(per_task, "c_adapter", "b_desc"),
        fitted_desc_minus_desc=difference(per_task, "d_adapter_desc", "b_desc"),
        fitted_minus_other_task=difference(per_task, "c_adapter", "c_mismatched"),
        conditions="c_adapter/d_adapter_desc: own fitted; c_mismatched: next task's fitted; c_random: shipped T2L",
        args=vars(args),
    )


if __name__ == "__main__":
    main()
