"""Does replaying earlier turns in each memory job keep the adapter from forgetting them?

A conversation memory learns turns in jobs, each warm-started from the adapter the last one left
(``hyperlora_integrations.memory``). A job fits its own text for a few dozen steps; it may pull
the adapter away from what earlier jobs stored. This runs a synthetic conversation of fictional
facts (one per user turn) through a real ``ConversationMemory`` with ``replay_tokens`` = 0 and
larger, and scores, under the final adapter, each fact's cloze target (the name or number blanked
out of its sentence: one of the objectives consolidation trains) for facts learned in the first
jobs ("old"), in the last job ("new") and in all jobs ("all"), against the bare model. Lower NLL
= better retained.

Runs on the tiny random model by default (the decision the package default rests on was taken
there: docs/memory.md, "Replay"); ``--real`` uses SmolLM2-135M (minutes per job on a CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.memory import MemoryConfig, MemoryManager

THINGS = ["dog", "cat", "boat", "bike", "parrot", "car", "horse", "hamster", "tortoise", "goldfish"]
NAMES = ["Brindle", "Quorra", "Tamsin", "Ovaltine", "Pellinore", "Zephyrine", "Mortlake", "Gusterby"]


def conversation(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (sentence, blanked sentence, answer) facts, alternating names and numbers."""
    rng = random.Random(seed)
    facts = []
    for i in range(n):
        thing = THINGS[i % len(THINGS)]
        answer = f"{rng.choice(NAMES)}{i}" if i % 2 == 0 else str(rng.randint(1000, 9999))
        kind = "is called" if i % 2 == 0 else "has the number"
        sentence = f"My {thing} {kind} {answer}."
        facts.append((sentence, sentence.replace(answer, "____"), answer))
    return facts


def cloze_nll(model, blanked: str, answer: str, adapters) -> float:
    prompt = f"Fill in the blank with the words from the document: {blanked}"
    nll, n = model.score_detailed(prompt, answer, adapters)
    return nll / n


def run(model, facts, config: MemoryConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore(tmp)
        memory = MemoryManager(model, store, config=config).memory("replay-study")
        job_of: dict[int, int] = {}
        for i, (sentence, _, _) in enumerate(facts):
            memory.add_message("user", sentence)
            if store.pending(namespace=memory.namespace):
                memory.worker.drain()
            job_of[i] = memory.watermark
        memory.consolidate_now()
        final = memory.adapters()
        learned = {t.seq: t.content for t in memory.turns() if t.seq <= memory.watermark}
        seqs = {t.content: t.seq for t in memory.turns()}
        jobs = sorted({seq for seq in [memory.watermark, *job_of.values()] if seq})
        first_jobs, last = jobs[: max(1, len(jobs) // 2)], jobs[-1]
        old, new, every = [], [], []
        for sentence, blanked, answer in facts:
            seq = seqs[sentence]
            if seq not in learned:
                continue
            job = next(j for j in jobs if j >= seq)
            row = (cloze_nll(model, blanked, answer, final), cloze_nll(model, blanked, answer, []))
            every.append(row)
            if job in first_jobs:
                old.append(row)
            elif job == last:
                new.append(row)
        store.close()

    def avg(rows, k):
        return sum(r[k] for r in rows) / len(rows) if rows else None

    return {
        "jobs": len(jobs),
        "old_facts": len(old),
        "new_facts": len(new),
        "old_nll": avg(old, 0),
        "old_nll_bare": avg(old, 1),
        "new_nll": avg(new, 0),
        "new_nll_bare": avg(new, 1),
        "all_facts": len(every),
        "all_nll": avg(every, 0),
        "all_nll_bare": avg(every, 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--facts", type=int, default=24)
    p.add_argument("--replay", default="0,64,128", help="replay_tokens values to compare")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--real", action="store_true", help="SmolLM2-135M instead of the tiny random model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.real:
        from hyperlora_integrations import HyperLoRAModel

        model = HyperLoRAModel.from_pretrained(t2l=None)
    else:
        from hyperlora_integrations.testing import tiny_hyperlora_model

        model = tiny_hyperlora_model(0)
    recipe = ConsolidationConfig(steps=args.steps, batch_size=4, max_seq_tokens=96, lr=args.lr)
    results: dict = {"args": vars(args), "runs": {}}
    for replay in (int(r) for r in args.replay.split(",")):
        config = MemoryConfig(
            recent_tokens=32, job_tokens=96, min_job_tokens=96, replay_tokens=replay, consolidation=recipe,
            background=False,
        )  # fmt: skip
        runs = [
            run(model, conversation(args.facts, seed), config.model_copy(update={"seed": seed}))
            for seed in range(args.seeds)
        ]
        results["runs"][replay] = runs
        keys = ("old_nll", "new_nll", "all_nll", "old_nll_bare", "new_nll_bare", "all_nll_bare")
        means = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
        results.setdefault("means", {})[replay] = means
        print(f"replay_tokens={replay}: jobs {runs[0]['jobs']}, " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
