"""Can a gradient-fitted adapter of the same shape carry a passage to a question it never saw?

The Doc-to-LoRA hypernetwork's held-out gain is all document-independent (a mismatched
document's adapter does as well). This probe asks whether that is the hypernetwork's limit or
the adapter's: for passages with at least three questions (held-out DROP, or SQuAD-shifts
Wikipedia paragraphs with ``--source new_wiki``), it fits one LoRA per passage by gradient
descent, with the training loss itself (``train_d2l.distill_loss``: top-k distillation to the
model with the passage in its prompt) on all but one of the passage's questions, then scores
the gold answer of the left-out question with

- (a) no document, (b) the passage in the prompt,
- (o) the passage's own fitted adapter, (m) another passage's fitted adapter,
- (c) the shipped hypernetwork's adapter and (cm) its adapter of another passage.

(o) − (m) is the part of the fitted gain that is about the passage. Same targets, rank and loss
as the hypernetwork: only the optimizer differs (per-passage steps instead of one forward pass).

    python -m research.probe_oracle --passages 24 --steps 30 --out docs/results/probe_oracle.json
    python -m research.probe_oracle --source new_wiki --out docs/results/probe_oracle_new_wiki.json

``--max-minutes`` stops fitting new passages after that wall time and scores those already fitted.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperlora_integrations.chat import context_prefix, encode_text
from hyperlora_integrations.metrics import bootstrap, mean
from hyperlora_integrations.model import HyperLoRAModel
from hyperlora_integrations.training import train_d2l
from hyperlora_integrations.training.data import olmo_drop, squad_shifts
from hyperlora_integrations.training.eval_d2l import _gap, _specific
from hyperlora_integrations.training.library import FittedAdapter
from hyperlora_integrations.training.train_d2l import distill_loss


def passages_with_questions(
    n: int, min_questions: int, seed: int, source: str = "drop"
) -> list[tuple[str, list[tuple[str, str]]]]:
    """Passages with several questions, as (passage, [(question, answer), ...]).

    ``drop``: held-out DROP (the hypernetwork never saw these). ``new_wiki``: SQuAD-shifts
    Wikipedia paragraphs from the training set, whose in-context gain is four times DROP's, so the
    fitted adapters' own-versus-other difference is measured on a larger gap; the hypernetwork's
    columns there are on documents it may have trained on.
    """
    by_passage: dict[str, list[tuple[str, str]]] = {}
    if source == "drop":
        for it in olmo_drop():
            if it.answers and it.answers[0] and len(it.passage) <= 2500:
                by_passage.setdefault(it.passage, []).append((it.question, it.answers[0]))
    else:
        by_passage = {d.passage: list(d.qas) for d in squad_shifts(source)}
    pool = [(p, qas) for p, qas in by_passage.items() if len(qas) >= min_questions]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--passages", type=int, default=24)
    p.add_argument("--steps", type=int, default=30, help="Adam steps per passage")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-qas", type=int, default=4, help="fitting questions per passage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--source", choices=["drop", "new_wiki"], default="drop", help="where the passages come from")
    p.add_argument("--out", default=None, help="also write rows and summary to this JSON file")
    p.add_argument(
        "--max-minutes", type=float, default=0, help="fit no new passage after this much wall time, then score (0: all)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = HyperLoRAModel.from_pretrained(t2l=None, device=args.device)
    net = model.d2l
    # The shipped run's loss settings (no L1: one free adapter has nothing to regularise towards).
    loss_args = train_d2l.parse_args(["--question-weight", "0.25", "--doc-weight-floor", "0.05", "--l1", "0"])
    loss_args.chunk_len = net.config.chunk_len
    prefix = context_prefix(model.tokenizer)
    # One chunk each, so the fitted adapter has exactly the hypernetwork's rank.
    pool = passages_with_questions(4 * args.passages, 3, args.seed, args.source)
    data = [d for d in pool if len(encode_text(model.tokenizer, d[0])) <= net.config.chunk_len][: args.passages]

    fitted, rows = [], []
    started = time.time()
    for passage, qas in tqdm(data, desc="fit per-passage adapters", unit="passage"):
        if args.max_minutes and time.time() - started > 60 * args.max_minutes and len(rows) >= 2:
            break  # score the passages fitted so far rather than lose them to an outer time limit
        probe, train = qas[0], qas[1 : 1 + args.max_qas]
        generated = model.internalize(passage, progress=False)
        fit = FittedAdapter(generated)
        opt = torch.optim.Adam(fit.parameters(), lr=args.lr)
        for _ in range(args.steps):
            loss, _info = distill_loss(model, fit, [passage], train, loss_args, prefix)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fitted.append((fit.adapter(), generated))
        q, a = probe
        none, n = model.score_detailed(q, a)
        ctx, _ = model.score_detailed(q, a, context=passage)
        rows.append({"question": q, "answer": a, "n": n, "nll_none": none / n, "nll_context": ctx / n})

    for i, row in enumerate(rows):
        q, a = row["question"], row["answer"]
        other = (i + 1) % len(rows)  # another passage's adapters on this question
        for key, adapter in (
            ("nll_fitted", fitted[i][0]),
            ("nll_fitted_other", fitted[other][0]),
            ("nll_hypernet", fitted[i][1]),
            ("nll_hypernet_other", fitted[other][1]),
        ):
            row[key] = model.score_detailed(q, a, [adapter])[0] / row["n"]

    col = {k: [r[k] for r in rows] for k in rows[0] if k.startswith("nll_")}
    abc = [col["nll_none"], col["nll_context"]]
    summary = {"source": args.source, "passages": len(rows), "steps": args.steps, "lr": args.lr}
    summary["nll"] = {k.removeprefix("nll_"): mean(v) for k, v in col.items()}
    for key in ("fitted", "fitted_other", "hypernet", "hypernet_other"):
        summary[f"gap_closure_{key}"] = bootstrap([*abc, col[f"nll_{key}"]], _gap)
    for key in ("fitted", "hypernet"):
        summary[f"specific_{key}"] = bootstrap([*abc, col[f"nll_{key}"], col[f"nll_{key}_other"]], _specific)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows, "args": vars(args)}, indent=2))
    return summary


if __name__ == "__main__":
    main()
