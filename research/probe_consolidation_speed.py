"""Where consolidation's time goes, and what a config change saves (a probe, not a benchmark).

Consolidates one ~512-token text (fictional dev documents joined, never the test split) under
several configs in one process and prints seconds, steps/s and target tokens per step for each.
The benchmark (`hyperlora bench --conditions consolidated`) is where the claim is measured.

    python -m research.probe_consolidation_speed --threads 2 --variants default,layers=none,layers=12
    python -m research.probe_consolidation_speed --threads 2 --variants packing=false,default
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.chat import encode_text
from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.training.eval_fictional import load_fixture


def docs_of(model: HyperLoRAModel, tokens: int) -> list[dict]:
    """Whole dev documents, as many as fit in ``tokens`` (one consolidation chunk at 512)."""
    docs: list[dict] = []
    for doc in load_fixture("dev"):
        candidate = "\n\n".join([d["text"] for d in docs] + [doc["text"]])
        if len(encode_text(model.tokenizer, candidate)) > tokens:
            break
        docs.append(doc)
    return docs


def text_of(model: HyperLoRAModel, tokens: int) -> str:
    return "\n\n".join(d["text"] for d in docs_of(model, tokens))


def quality(model: HyperLoRAModel, docs: list[dict], **kwargs) -> dict:
    """Gold-answer NLL per token and greedy answers containing the gold answer, over the joined
    documents' questions (dev split: this probe chooses; the test split confirms)."""
    nll, hits, n = 0.0, 0, 0
    for doc in docs:
        for q in doc["questions"]:
            total, tokens = model.score_detailed(q["question"], q["answer"], **kwargs)
            nll += total / tokens
            out = model.generate(q["question"], max_new_tokens=16, **kwargs)
            hits += int(q["answer"].lower() in out.lower())
            n += 1
    return {"nll": round(nll / n, 3), "hits": f"{hits}/{n}"}


def variant(spec: str) -> ConsolidationConfig:
    update = {}
    for part in filter(None, spec.split("+")):
        if part == "default":
            continue
        key, value = part.split("=")
        if value in ("none", "true", "false"):
            update[key] = {"none": None, "true": True, "false": False}[value]
        else:
            update[key] = int(value) if value.isdigit() else float(value)
    return ConsolidationConfig(**update)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--variants", default="default,layers=none")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--questions", action="store_true", help="also score the joined dev documents' questions")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HyperLoRAModel.from_pretrained()
    docs = docs_of(model, args.tokens)
    text = "\n\n".join(d["text"] for d in docs)
    print(f"text: {len(encode_text(model.tokenizer, text))} tokens, {len(docs)} dev documents")
    if args.questions:
        print("none", json.dumps(quality(model, docs)), flush=True)
        print("context", json.dumps(quality(model, docs, context=text)), flush=True)
    model.consolidate("Warm-up sentence about nothing in particular.", steps=1, progress=False)
    out = {}
    for spec in args.variants.split(","):
        config = variant(spec)
        t0 = time.perf_counter()
        adapter = model.consolidate(text, config=config, steps=args.steps, progress=False)
        seconds = time.perf_counter() - t0
        summary = adapter.metadata.model_extra["consolidation"]
        out[spec] = {
            "seconds": round(seconds, 1),
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "cached": summary["frozen_layers_cached"],
            "packed": summary.get("packed", False),
        }
        if args.questions:
            out[spec].update(quality(model, docs, adapters=[adapter]))
        print(spec, json.dumps(out[spec]), flush=True)


if __name__ == "__main__":
    main()
