"""A library of *consolidated* skill adapters for Text-to-LoRA reconstruction (issue 22, part 2).

``research/fit_library.py`` fits one adapter per task on its gold examples; reconstruction onto
that library did not make the hypernetwork carry its description (docs/text-to-lora.md). A
consolidated skill does carry its description (its own skill beats another task's by 2.9 nats on
the held-out skills). This writes one per (training family, description): the same
``generate_skill(description, consolidate=True)`` a user calls, warm-started from the shipped
instant adapter, so a paraphrase of a family is a target of its own, as the published design
pairs each description with its task's adapter.

Held-out families (``task_families``' whole held-out groups) get one consolidated adapter each
(their first description), written with split ``held``: ``train t2l --reconstruct`` reads them
only for its held-out probe (does the description predict the right delta?), never to train.

    python -m research.consolidated_library --threads 1 --shard 0/2 --out runs/t2l-consolidated &
    python -m research.consolidated_library --threads 1 --shard 1/2 --out runs/t2l-consolidated
    hyperlora train t2l --reconstruct runs/t2l-consolidated --family-tasks --weighted --encoder minilm ...

Each entry's record carries its description and 8 gold examples, so the training run reads the
library alone (``library.described_tasks``). A rerun skips entries already written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training.library import file_name, save_fit
from hyperlora_integrations.training.tasks import Task


def entries(words, seed: int = 0) -> list[tuple[Task, str]]:
    """(single-description task, split): one per training family and description, one per
    held-out family (its first description)."""
    from hyperlora_integrations.training.task_families import family_tasks

    train, held = family_tasks(words, seed=seed)
    out = [
        (Task(f"{name}#{d}", task.kind, [text], task.examples), "train")
        for name, task in train.items()
        for d, text in enumerate(task.descriptions)
    ]
    out += [(Task(name, task.kind, task.descriptions[:1], task.examples), "held") for name, task in held.items()]
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/t2l-consolidated")
    p.add_argument("--shard", default="0/1", help="i/n: only every n-th entry starting at i")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from hyperlora_integrations.consolidation.skill_targets import vocab_words

    model = HyperLoRAModel.from_pretrained(d2l=None)
    i, n = map(int, args.shard.split("/"))
    todo = [
        (t, s)
        for t, s in entries(vocab_words(model.tokenizer), args.seed)[i::n]
        if not (out / file_name(t.name, ".json")).exists()
    ]
    for task, split_name in tqdm(todo, desc="consolidating skills", unit="skill"):
        t0 = time.time()
        # Inputs that are the family's own gold examples stay out of the teacher's inputs only by
        # chance; the targets are the teacher's distributions, never the gold outputs.
        adapter = model.generate_skill(task.descriptions[0], consolidate=True, seed=args.seed)
        info = adapter.metadata.consolidation or {}
        save_fit(
            out,
            task,
            split_name,
            adapter.to("cpu"),
            {
                "sec": round(time.time() - t0, 1),
                "loss_first": info.get("loss_first"),
                "loss_last": info.get("loss_last"),
            },
        )
    return out


if __name__ == "__main__":
    main()
