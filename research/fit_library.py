"""Fit one adapter per task by gradient descent: the targets of Text-to-LoRA reconstruction training.

``probe_oracle_t2l`` showed that an adapter of the generated shape, fitted with the SFT loss on
~100 examples of a held-out task, beats the description in the prompt; the hypernetwork trained
by SFT alone does not. The published Text-to-LoRA also trains by *reconstruction*: regress the
hypernetwork's output onto a library of per-task adapters. This writes that library.

Every fit starts from the same random A (``--init-seed``) and B = 0. A still moves (on the
default model by about 0.7 of its norm in 20 steps), so adapters are compared and regressed
by their weight deltas ``B @ A`` (``lora.delta_sq_distance``), never factor by factor.
Held-out tasks are fitted only on examples after the ones ``hyperlora eval t2l`` scores, and
only for analysis: reconstruction training never reads them.

    python -m research.fit_library --split train --threads 2 --out runs/t2l-library
    python -m research.fit_library --split held --threads 2 --out runs/t2l-library

Two files per task: ``<task>.safetensors`` (an ``Adapter``) and ``<task>.json`` (split, kind,
fit losses), in the format of ``hyperlora_integrations.training.library``, which
``train t2l --reconstruct`` reads. A rerun skips tasks already fitted, so an interrupted run
resumes, and ``--shard i/n`` splits the tasks over processes (two one-thread processes fit
faster than one two-thread process on this CPU).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperlora_integrations.lora import Adapter
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_t2l
from hyperlora_integrations.training.library import FittedAdapter, file_name, save_fit
from hyperlora_integrations.training.tasks import Example, Task, load_tasks, split
from hyperlora_integrations.training.train_t2l import sft_loss


def fit_task(
    model: HyperLoRAModel,
    like: Adapter,
    pool: list[Example],
    rng: random.Random,
    *,
    steps: int,
    batch: int,
    lr: float,
    max_input_tokens: int,
    seed: int | None = None,
):
    """One adapter shaped like ``like``, fitted with the T2L training loss on ``pool``.

    ``seed`` fixes the initial A (None: the global torch generator's next draw). Returns
    (adapter, {first5, last5}: mean CE of the first and last five steps).
    """
    fit_args = train_t2l.parse_args(["--max-input-tokens", str(max_input_tokens)])
    if seed is not None:
        torch.manual_seed(seed)
    fit = FittedAdapter(like)
    opt = torch.optim.Adam(fit.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        rows = rng.sample(pool, min(batch, len(pool)))
        ce, _l2 = sft_loss(model, fit, torch.zeros(len(rows), 1), rows, fit_args, fit_args.label_smoothing)
        ce.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(ce.detach()))
    k = min(5, len(losses))
    return fit.adapter(), {"first5": sum(losses[:k]) / k, "last5": sum(losses[-k:]) / k}


def fit_pool(task: Task, held_out: bool, args) -> list[Example]:
    """Examples a fit may use: for held-out tasks only those after the evaluated ones."""
    skip = (args.eval_mc if task.kind == "mc" else args.eval_gen) if held_out else 0
    return task.examples[skip : skip + args.fit_examples]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", choices=["train", "held"], default="train")
    p.add_argument("--out", default="runs/t2l-library")
    p.add_argument("--steps", type=int, default=25, help="Adam steps per task")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fit-examples", type=int, default=64, help="examples per task the fit may use")
    p.add_argument("--max-input-tokens", type=int, default=128)
    p.add_argument("--eval-mc", type=int, default=100, help="held-out MC examples reserved for evaluation")
    p.add_argument("--eval-gen", type=int, default=30, help="held-out generation examples reserved for evaluation")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the shared initial A")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extended-tasks", action="store_true", help="also BIG-bench subtasks and MMLU subjects")
    p.add_argument("--template-tasks", action="store_true", help="also promptsource-template tasks")
    p.add_argument("--shard", default="0/1", help="i/n: fit only every n-th task starting at i")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device of the base model and the fits (cpu, cuda)")
    p.add_argument("--max-minutes", type=float, default=0, help="fit no new task after this wall time (0: all)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = HyperLoRAModel.from_pretrained(d2l=None, device=args.device)
    train, held = split(load_tasks(seed=args.seed, extended=args.extended_tasks, templates=args.template_tasks))
    tasks = train if args.split == "train" else held
    like = model.generate_skill("shape only")
    started = time.time()
    i, n = map(int, args.shard.split("/"))
    todo = [t for t in tasks[i::n] if not (out / file_name(t.name, ".json")).exists()]
    for task in tqdm(todo, desc=f"fit {args.split} tasks", unit="task"):
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            print(f"stopping after {args.max_minutes} minutes; the same command resumes")
            break
        rng = random.Random(f"{args.seed}:{task.name}")
        t0 = time.time()
        pool = fit_pool(task, args.split == "held", args)
        adapter, losses = fit_task(
            model,
            like,
            pool,
            rng,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            max_input_tokens=args.max_input_tokens,
            seed=args.init_seed,
        )
        save_fit(out, task, args.split, adapter.to("cpu"), {**losses, "sec": round(time.time() - t0, 1)})
    return out


if __name__ == "__main__":
    main()
