"""Ablation: how to combine the chunk adapters of a long document.

Same benchmark documents and questions as ``hyperlora bench`` (held-out passages concatenated
to a length, questions about passages at several depths). For each question, gold-answer NLL
per token with: no document; the document in the prompt (up to 4k tokens); and the document's
chunk adapters combined four ways: unscaled rank concatenation; each chunk scaled by
``trained_chunks / n`` (what ``internalize`` ships); each scaled by ``1 / sqrt(n)``; and only the
chunk that BM25 ranks first for the question.

    python -m research.long_document_scaling --plan 2048:2x3,8192:1x6 --out runs/long_scaling.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.adapters.retrieval import BM25Index
from hyperlora_integrations.bench.documents import LengthPlan, build_documents, load_pool
from hyperlora_integrations.chat import encode_text
from hyperlora_integrations.encoders.activations import chunk_ids
from hyperlora_integrations.lora.adapter import Adapter


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d2l", default="default")
    p.add_argument("--plan", default="2048:2x3,8192:1x6")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/long_scaling.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HyperLoRAModel.from_pretrained(d2l=args.d2l, t2l=None)
    net = model.d2l
    docs = build_documents(load_pool(0), LengthPlan.parse(args.plan), model.count_tokens, seed=0)
    results = {}
    for length, doc_list in docs.items():
        rows = []
        for doc in doc_list:
            chunks = chunk_ids(encode_text(model.tokenizer, doc.text), net.config.chunk_len)
            n = len(chunks)
            shipped = model.internalize(doc.text)  # chunks scaled by min(1, trained_chunks / n)
            rank = net.config.lora.rank
            s_shipped = min(1.0, net.config.trained_chunks / n)

            def combine(indices, scale, shipped=shipped, rank=rank, s_shipped=s_shipped):
                """Chunk blocks ``indices`` of the shipped adapter, rescaled to ``scale`` each."""
                A = {k: torch.cat([v[:, i * rank : (i + 1) * rank] for i in indices], 1) for k, v in shipped.A.items()}
                B = {
                    k: torch.cat([v[:, :, i * rank : (i + 1) * rank] for i in indices], 2) * (scale / s_shipped)
                    for k, v in shipped.B.items()
                }
                return Adapter(A, B, scaling=shipped.scaling, metadata=shipped.metadata)

            index = BM25Index()
            for i, c in enumerate(chunks):
                index.add(str(i), model.tokenizer.decode(c))
            for q in doc.questions:
                gold = q.answers[0]
                best = [int(k) for k, _ in index.search(q.question, k=1)] or [0]
                variants = {
                    "none": {},
                    "concat_unscaled": {"adapters": [combine(range(n), 1.0)]},
                    "shipped_trained_over_n": {"adapters": [shipped]},
                    "inv_sqrt_n": {"adapters": [combine(range(n), 1 / math.sqrt(n))]},
                    "bm25_top_chunk": {"adapters": [combine(best, 1.0)]},
                }
                if length <= 4096:
                    variants["context"] = {"context": doc.text}
                row = {"chunks": n, "depth": q.depth}
                for key, kwargs in variants.items():
                    nll, tokens = model.score_detailed(q.question, gold, **kwargs)
                    row[key] = nll / tokens
                rows.append(row)
                print(length, {k: round(v, 3) for k, v in row.items()}, flush=True)
        keys = [k for k in rows[0] if k not in ("chunks", "depth")]
        results[length] = {"n": len(rows), "chunks": rows[0]["chunks"]} | {
            k: sum(r[k] for r in rows) / len(rows) for k in keys
        }
        print("MEAN", length, json.dumps(results[length]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"checkpoint": args.d2l, "plan": args.plan, "mean_nll": results}, f, indent=2)


if __name__ == "__main__":
    main()
