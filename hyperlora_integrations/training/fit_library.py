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

    python -m hyperlora_integrations.training.fit_library --split train --threads 2 --out runs/t2l-library
    python -m hyperlora_integrations.training.fit_library --split held --threads 2 --out runs/t2l-library

Two files per task: ``<task>.safetensors`` (an ``Adapter``) and ``<task>.json`` (split, kind,
fit losses). A rerun skips tasks already fitted, so an interrupted run resumes, and
``--shard i/n`` splits the tasks over processes (two one-thread processes fit faster than one
two-thread process on this CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..lora import Adapter
from ..model import HyperLoRAModel
from . import train_t2l
from .probe_oracle import FittedAdapter
from .tasks import Example, Task, load_tasks, split
from .train_t2l import sft_loss


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


@torch.no_grad()
def input_gram(model: HyperLoRAModel, examples: list[Example], modules: list[str], args) -> dict[str, torch.Tensor]:
    """``E[x x']`` of each target module's input per layer, over the tokens of ``examples``
    (prompt and target, as the SFT loss sees them): ``{module: (L, d_in, d_in)}``."""
    sums: dict[tuple[str, int], torch.Tensor] = {}
    count = 0
    keep: list[torch.Tensor] = []

    def hook_for(key):
        def hook(module, inputs, output):
            x = inputs[0][keep[0]].double()
            sums[key] = sums.get(key, 0) + x.T @ x

        return hook

    handles = [
        t.module.register_forward_hook(hook_for(key)) for key, t in model.injector.targets.items() if key[0] in modules
    ]
    try:
        for i in tqdm(range(0, len(examples), 8), desc="input second moments", unit="batch"):
            ids, mask, _labels = train_t2l.sft_batch(model, examples[i : i + 8], args)
            keep[:] = [mask.bool()]
            model.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    layers = model.injector.num_layers
    return {m: torch.stack([sums[(m, layer)] / count for layer in range(layers)]).float() for m in modules}


def gram_root(gram: torch.Tensor, k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S (L, d_in, k), tail (L,))`` with ``gram ~= S S' + tail I`` per layer.

    The top ``k`` eigen-directions are kept exactly and the rest is treated as isotropic at their
    mean eigenvalue, so the activation-weighted distance costs two rank-``k`` products instead of
    one ``d_in x d_in`` one per adapter row. Exact when ``k == d_in``.
    """
    vals, vecs = torch.linalg.eigh(gram.double())  # ascending
    vals, vecs = vals.clamp_min(0).flip(-1), vecs.flip(-1)
    k = min(k, vals.shape[-1])
    rest = vals[..., k:]
    tail = rest.mean(-1) if rest.shape[-1] else torch.zeros_like(vals[..., 0])
    root = vecs[..., :k] * (vals[..., None, :k] - tail[..., None, None]).clamp_min(0).sqrt()
    return root.float(), tail.float()


def library_gram(folder: Path, model: HyperLoRAModel, tasks: list[Task], modules: list[str], args) -> dict:
    """The input second moments of the library's training tasks (2 examples each), cached in
    ``folder/gram-<key>.safetensors``.

    The key names the task set, the modules and the input cut, so a library that grew (or a
    run over part of it) never reads second moments of another task set. Tasks are visited in
    name order, so the same set gives the same moments whichever caller computes them first.
    """
    from safetensors.torch import load_file, save_file

    tasks = sorted(tasks, key=lambda t: t.name)
    spec = {"tasks": [t.name for t in tasks], "modules": sorted(modules), "max_input_tokens": args.max_input_tokens}
    key = hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:12]
    path = Path(folder) / f"gram-{key}.safetensors"
    if path.exists():
        return load_file(str(path))
    rng = random.Random(0)
    examples = [ex for t in tasks for ex in rng.sample(t.examples, min(2, len(t.examples)))]
    gram = input_gram(model, examples, modules, args)
    save_file({m: g.contiguous() for m, g in gram.items()}, str(path), metadata={"spec": json.dumps(spec)})
    return gram


def file_name(task_name: str, suffix: str = ".safetensors") -> str:
    return task_name.replace("/", "__") + suffix


def fit_pool(task: Task, held_out: bool, args) -> list[Example]:
    """Examples a fit may use: for held-out tasks only those after the evaluated ones."""
    skip = (args.eval_mc if task.kind == "mc" else args.eval_gen) if held_out else 0
    return task.examples[skip : skip + args.fit_examples]


def save_fit(folder: Path, task: Task, split_name: str, adapter: Adapter, info: dict) -> None:
    """The adapter, then its record: a task counts as fitted once its ``.json`` exists."""
    adapter.metadata.kind = "skill"
    adapter.metadata.description = task.descriptions[0]
    adapter.save(folder / file_name(task.name))
    record = {"task": task.name, "split": split_name, "kind": task.kind, **info}
    (folder / file_name(task.name, ".json")).write_text(json.dumps(record))


def load_library(folder: str | Path, split_name: str = "train") -> dict[str, tuple[Adapter, dict]]:
    """Fitted adapters of one split by task name, each with its fit record."""
    out = {}
    for info_path in sorted(Path(folder).glob("*.json")):
        info = json.loads(info_path.read_text())
        if info.get("split") == split_name:
            out[info["task"]] = (Adapter.load(info_path.with_suffix(".safetensors")), info)
    return out


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
