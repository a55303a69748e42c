"""Train Doc-to-LoRA by context distillation. Read top to bottom.

Teacher: the frozen model with the document in its prompt. Student: the same model with the
generated adapter and no document. One forward pass over [prefix | document | QA] gives both the
teacher's log-probs on the QA tokens and the document activations the hypernetwork reads. The
student is trained to match the teacher's top-k next-token distribution on the QA tokens, answer
tokens weighted above question tokens. ``--doc-weight-floor`` further weights each position by how
much the document moves it (KL of teacher to the model without the document): without it, the
cheapest gain is a document-independent shift in answer style, which every adapter then carries.
``--center K`` attacks that directly: the student's adapter has the mean of the last K generated
adapters (no gradient) subtracted and a learned static adapter added, so the shared part moves
into the static adapter and the hypernetwork is paid only for what differs between documents.

Curriculum: single-passage documents first; after ``--multi-from`` steps, a share of samples are
2 to ``--max-chunks`` passages, each encoded as its own chunk and rank-concatenated, with questions
about any of them, so concatenation is trained rather than hoped for.

Runs on a 2-core CPU: one document per micro-step, gradient accumulation, a checkpoint every
``--save-every`` steps, resume from ``<out>/state.safetensors``, JSONL log with held-out NLL.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..chat import context_prefix, encode_chat, encode_text
from ..encoders.activations import document_activations, layer_inputs
from ..hypernets import DocToLoRA
from ..hypernets import checkpoint as ckpt
from ..lora import LoraSpec
from ..model import HyperLoRAModel
from .common import add_contrast_args, add_run_args, lr_at, save_or_stop, training_model
from .data import QADoc
from .eval_d2l import mismatched_index
from .state import load_state


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora train d2l", description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default=None, help="HF id or local path (default: embedded SmolLM2-135M)")
    p.add_argument("--out", default="runs/d2l", help="run directory (checkpoints, log)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--accum", type=int, default=4, help="documents per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="down_proj", help="comma-separated target modules")
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--num-latents", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--chunk-len", type=int, default=384, help="longest chunk in training (tokens)")
    p.add_argument("--max-qas", type=int, default=4, help="questions per document and step")
    p.add_argument("--top-k", type=int, default=16, help="teacher log-probs kept per position")
    p.add_argument("--l1", type=float, default=0.1, help="L1 penalty on the generated B weights")
    p.add_argument(
        "--question-weight",
        type=float,
        default=0.25,
        help="loss weight of question/template tokens relative to answer tokens (1.0: uniform)",
    )
    p.add_argument(
        "--doc-weight-floor",
        type=float,
        default=None,
        help="weight QA positions by KL(teacher || model without the document) + this floor, so positions "
        "where the document changes the prediction dominate (default: off)",
    )
    p.add_argument(
        "--center",
        type=int,
        default=0,
        help="centred hypernetwork: subtract the mean of this many recent adapters, learn a static one (0: off)",
    )
    add_contrast_args(p, "document")
    p.add_argument("--multi-from", type=int, default=300, help="step at which multi-chunk samples start")
    p.add_argument("--multi-prob", type=float, default=0.3)
    p.add_argument("--max-chunks", type=int, default=4, help="most passages in a multi-chunk sample")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-items", type=int, default=32)
    p.add_argument("--save-every", type=int, default=25)
    add_run_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny random base model (tests)")
    p.add_argument("--docs-json", default=None, help="JSON list of {passage, qas} instead of the real data")
    return p.parse_args(argv)


def qa_messages(qas: list[tuple[str, str]]) -> list[dict[str, str]]:
    messages = []
    for q, a in qas:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def answer_mask(tok, qas: list[tuple[str, str]], n_ids: int) -> torch.Tensor:
    """True at student token positions that belong to an assistant answer (its end marker too)."""
    mask = torch.zeros(n_ids, dtype=torch.bool)
    messages = qa_messages(qas)
    for i in range(len(qas)):
        start = len(encode_chat(tok, messages[: 2 * i + 1], add_generation_prompt=True))
        end = len(encode_chat(tok, messages[: 2 * i + 2], add_generation_prompt=False))
        mask[start:end] = True
    return mask


def distill_loss(model: HyperLoRAModel, net: DocToLoRA, passages: list[str], qas, args, prefix, negative=None):
    """Loss for one (multi-)passage document: top-k KL to the teacher + L1 on generated weights.

    ``negative``: the activations of another single-chunk document. With ``args.contrast`` > 0 the
    student is also run with that document's adapter on these questions, and a soft hinge asks the
    matched adapter to fit the teacher better than the mismatched one by about ``contrast_margin``
    nats per token. Plain distillation is satisfied by what every adapter shares (answer style);
    this term pays only for what the adapter knows of its own document.
    """
    tok, lm = model.tokenizer, model.model
    chunks = [encode_text(tok, p)[: args.chunk_len] for p in passages]
    document = tok.decode([i for c in chunks for i in c])  # what the teacher sees
    student_ids = encode_chat(tok, qa_messages(qas), add_generation_prompt=False)
    teacher_ids = encode_chat(tok, qa_messages(qas), add_generation_prompt=False, context=document)
    k = len(prefix)
    shift = len(teacher_ids) - len(student_ids)  # document + separator tokens inserted at k
    n_doc = len(chunks[0])
    device = model.base.device

    # Teacher pass (no grad): QA log-probs and, for the first chunk, the document activations.
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([teacher_ids], device=device), output_hidden_states=True, use_cache=False)
        acts = [layer_inputs(out.hidden_states, lm.config.num_hidden_layers)[0, :, k : k + n_doc]]
        if len(chunks) > 1 or tok.decode(chunks[0]) != document:
            acts = [document_activations(lm, c, prefix) for c in chunks]
        positions = torch.arange(k - 1, len(student_ids) - 1, device=device)
        t_logits = lm.lm_head(out.last_hidden_state[0, positions + shift]).float()
        t_logp = F.log_softmax(t_logits, dim=-1)
        top_logp, top_idx = t_logp.topk(args.top_k, dim=-1)
        top_p = top_logp.exp()

        if getattr(args, "doc_weight_floor", None) is not None:
            # How much the document moves each prediction: the base model's view without it.
            bare = lm.model(input_ids=torch.tensor([student_ids], device=device), use_cache=False).last_hidden_state
            bare_logp = F.log_softmax(lm.lm_head(bare[0, positions]).float(), dim=-1)
            doc_shift = (t_logp.exp() * (t_logp - bare_logp)).sum(-1).clamp(min=0)

    # Student pass: adapters from the hypernet, rank-concatenated over chunks, gradients to the net.
    A_parts, B_parts = [], []
    for a in acts:
        A, B = net(a[None])
        A_parts.append(A)
        B_parts.append(B)
    A = {m: torch.cat([p[m][0] for p in A_parts], dim=1) for m in A_parts[0]}
    B = {m: torch.cat([p[m][0] for p in B_parts], dim=2) for m in B_parts[0]}
    centred = bool(getattr(getattr(net, "config", None), "center_bank", 0))
    if centred:
        cA, cB = net.centering(float(len(chunks)))

    def with_centering(A, B):
        """A centred net's adapter: the generated one plus the static and (minus) reference blocks."""
        if not centred:
            return A, B
        return {m: torch.cat([A[m], cA[m]], dim=1) for m in A}, {m: torch.cat([B[m], cB[m]], dim=2) for m in B}

    A, B = with_centering(A, B)
    # Answer tokens carry what the document tells; question and template tokens get less weight.
    is_answer = answer_mask(tok, qas, len(student_ids))[positions.cpu() + 1].to(device)
    weight = torch.where(is_answer, 1.0, getattr(args, "question_weight", 1.0))
    if getattr(args, "doc_weight_floor", None) is not None:
        weight = weight * (doc_shift + args.doc_weight_floor)
    weight = weight / weight.sum()

    def student_ce(A, B) -> torch.Tensor:
        with model.injector.activate_weights(A, B):
            hidden = lm.model(input_ids=torch.tensor([student_ids], device=device), use_cache=False).last_hidden_state
        s_logp = F.log_softmax(lm.lm_head(hidden[0, positions]).float(), dim=-1)
        return -((top_p * s_logp.gather(-1, top_idx)).sum(-1) * weight).sum()

    ce = student_ce(A, B)
    kl = ce + ((top_p * top_logp).sum(-1) * weight).sum()
    # L1 on what the hypernetwork generated (not on a centred net's static or reference blocks).
    l1 = sum(p[m].abs().mean() for p in B_parts for m in p) / (len(B_parts) * len(B_parts[0]))
    loss = ce + args.l1 * l1
    info = {"kl": float(kl.detach()), "l1": float(l1.detach()), "chunks": len(chunks), "acts": acts}
    contrast = getattr(args, "contrast", 0.0)
    if contrast and negative is not None and len(chunks) == 1:
        nA, nB = net(negative[None])
        nA, nB = with_centering({m: a[0] for m, a in nA.items()}, {m: b[0] for m, b in nB.items()})
        margin = (student_ce(nA, nB) - ce) / args.contrast_margin  # > 1: matched wins by the margin
        loss = loss + contrast * args.contrast_margin * F.softplus(1.0 - margin)
        info["ce_gap"] = float(margin.detach()) * args.contrast_margin
    info["adapter"] = (  # the first chunk's adapter, for a centred net's reference bank
        {m: a[0].detach() for m, a in A_parts[0].items()},
        {m: b[0].detach() for m, b in B_parts[0].items()},
    )
    return loss, info


@torch.no_grad()
def heldout_nll(model: HyperLoRAModel, net: DocToLoRA, items, baselines=None) -> dict:
    """Per-token gold-answer NLL: no document (a), document in prompt (b), adapter (c)."""
    net.eval()
    was_d2l, model.d2l = model.d2l, net
    a_sum = b_sum = c_sum = m_sum = 0.0
    rows = []
    adapters = [model.internalize(it.passage) for it in items]
    for i, it in enumerate(items):
        if baselines is None:
            a, n = model.score_detailed(it.question, it.answers[0])
            b, _ = model.score_detailed(it.question, it.answers[0], context=it.passage)
        else:
            a, b, n = baselines[i]
        c, _ = model.score_detailed(it.question, it.answers[0], [adapters[i]])
        # Control: another passage's adapter from the same source (as in ``hyperlora eval d2l``).
        mm, _ = model.score_detailed(it.question, it.answers[0], [adapters[mismatched_index(items, i)]])
        rows.append((a, b, n))
        a_sum, b_sum, c_sum, m_sum = a_sum + a / n, b_sum + b / n, c_sum + c / n, m_sum + mm / n
    model.d2l = was_d2l
    net.train()
    m = len(items)
    den = max(1e-9, a_sum - b_sum)
    return {
        "nll_none": a_sum / m,
        "nll_context": b_sum / m,
        "nll_adapter": c_sum / m,
        "nll_mismatched": m_sum / m,
        "gap_closure": (a_sum - c_sum) / den,
        "gap_closure_specific": (m_sum - c_sum) / den,
        "_rows": rows,
    }


def _eval_key(items) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([[i.passage, i.question, i.answers] for i in items]).encode()).hexdigest()[:16]


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Base model and data.
    model = training_model(args.tiny, args.base_model, args.device)
    started = time.time()
    if args.docs_json:
        docs = [
            QADoc(d["passage"], [tuple(x) for x in d["qas"]], "json")
            for d in json.loads(Path(args.docs_json).read_text())
        ]
        eval_items = []
    else:
        from .data import d2l_eval_items, d2l_training_docs

        docs = d2l_training_docs()
        eval_items = d2l_eval_items(per_source=max(1, args.eval_items // 4), seed=1)
    rng = random.Random(args.seed)
    rng.shuffle(docs)

    # Hypernetwork and optimizer (resumed if a state file exists).
    lora = LoraSpec(target_modules=tuple(args.targets.split(",")), rank=args.rank, alpha=args.rank)
    net = DocToLoRA.for_model(
        model,
        lora=lora,
        latent_dim=args.latent_dim,
        num_latents=args.num_latents,
        num_blocks=args.num_blocks,
        chunk_len=args.chunk_len,
        trained_chunks=args.max_chunks,
        center_bank=args.center,
    ).to(args.device)
    if args.init:
        source = ckpt.load(args.init, device=args.device)
        missing, unexpected = net.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("static_", "ref_")) for k in missing):
            raise ValueError(f"--init {args.init} does not fit: missing={missing} unexpected={unexpected}")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    state_path = out / "state.safetensors"
    start, cursor, baselines = 0, 0, None
    if state_path.exists():
        info = load_state(state_path, net, opt)
        start, cursor = info["step"], info["cursor"]
        baselines = info.get("baselines")
        if info.get("eval_key") != _eval_key(eval_items):
            baselines = None  # the held-out probe set changed: recompute its baselines
        print(f"resumed from step {start}")
    prefix = context_prefix(model.tokenizer)
    bank: deque = deque(maxlen=args.center or 1)
    if args.center:
        if start == 0:  # a new centred run: the first documents' adapters are the reference
            net.eval()
            with torch.no_grad():
                for d in docs[-args.center :]:
                    acts = document_activations(
                        model.model, encode_text(model.tokenizer, d.passage)[: args.chunk_len], prefix
                    )
                    A, B = net(acts[None])
                    bank.append(({m: a[0] for m, a in A.items()}, {m: b[0] for m, b in B.items()}))
            net.set_reference(list(bank))
            net.init_static_from_reference()
        else:
            bank.extend(net.reference_bank())
    net.train()
    log = (out / "log.jsonl").open("a")
    if eval_items and baselines is None:
        first = heldout_nll(model, net, eval_items)
        baselines = first.pop("_rows")
        log.write(json.dumps({"step": start, **first}) + "\n")
        log.flush()

    recent: dict[str, tuple[str, torch.Tensor]] = {}  # source -> (passage, activations)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train d2l", unit="step")
    for step in bar:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        stats = {"loss": 0.0, "kl": 0.0, "chunks": 0}
        for _ in range(args.accum):
            n_pass = 1
            if step >= args.multi_from and rng.random() < args.multi_prob:
                n_pass = rng.randint(2, args.max_chunks)
            picked = [docs[(cursor + j) % len(docs)] for j in range(n_pass)]
            cursor += n_pass
            qas = [qa for d in picked for qa in rng.sample(d.qas, min(len(d.qas), max(1, args.max_qas // n_pass)))]
            rng.shuffle(qas)
            # Negative for the contrastive term: the last single passage seen from the same source,
            # so the two adapters differ in content rather than in source style.
            negative = recent.get(picked[0].source) if n_pass == 1 else None
            if negative is not None and negative[0] == picked[0].passage:
                negative = None
            loss, info = distill_loss(
                model,
                net,
                [d.passage for d in picked],
                qas[: args.max_qas],
                args,
                prefix,
                negative=None if negative is None else negative[1],
            )
            if n_pass == 1:
                recent[picked[0].source] = (picked[0].passage, info["acts"][0].clone())
            if "ce_gap" in info:
                stats["ce_gap"] = stats.get("ce_gap", 0.0) + info["ce_gap"] / args.accum
            (loss / args.accum).backward()
            stats["loss"] += float(loss.detach()) / args.accum
            stats["kl"] += info["kl"] / args.accum
            stats["chunks"] = max(stats["chunks"], info["chunks"])
            if args.center:
                bank.append(info["adapter"])
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.center:
            net.set_reference(list(bank))
        record = {"step": step + 1, "lr": lr_at(step, args), "sec": round(time.time() - t0, 2), **stats}
        bar.set_postfix(loss=f"{stats['loss']:.3f}", kl=f"{stats['kl']:.3f}")
        if eval_items and (step + 1) % args.eval_every == 0:
            record.update({k: v for k, v in heldout_nll(model, net, eval_items, baselines).items() if k != "_rows"})
            bar.write(
                f"step {step + 1}: held-out gap closure {record['gap_closure']:.3f}, "
                f"document-specific {record['gap_closure_specific']:.3f}"
            )
        log.write(json.dumps(record) + "\n")
        log.flush()
        state = {"step": step + 1, "cursor": cursor, "baselines": baselines, "args": vars(args)}
        if save_or_stop(step, args, started, out, net, opt, state, bar):
            break
    return out / "checkpoint"


if __name__ == "__main__":
    main()
