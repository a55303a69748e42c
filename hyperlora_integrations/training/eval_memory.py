"""Long-term memory on held-out conversations (``hyperlora eval memory``).

The fixture (``bench/fixtures/memory_conversations.json``) holds multi-session conversations
written for this project: fictional users state facts about themselves in early sessions, small
talk then pushes those facts out of the recent-turn window, and three questions per user have
short gold answers from the user's own words. Each user's turns go through a real
``ConversationMemory`` (one message at a time, the worker keeping up, then a final flush), so the
consolidated condition is what the package serves. Per question, the greedy answer under

- ``none``: the question alone;  ``full``: the whole history in the prompt;
- ``truncated``: only the recent window (what a buffer memory keeps);
- ``consolidated``: the recent window plus the user's memory adapter;
- ``control``: the recent window plus the *next* user's memory adapter: an adapter that helps
  by its mere presence passes this, only one carrying this user's facts fails it.

Reported: answers containing the gold answer (all questions, and those whose answer is not in
the window text), with 95 % bootstrap intervals over users (questions of one user are not
independent); prompt tokens and seconds per answer. A latency study extends conversations with
other users' small talk and times one reply at growing lengths under full history, truncated
and consolidated memory; plotted with matplotlib when installed. Memory stores are cached under
``--cache`` (a rerun, or a resume after a kill, trains nothing already trained).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import AdapterStore
from ..consolidation import ConsolidationConfig
from ..memory import ConversationMemory, MemoryConfig, MemoryManager
from ..memory.conversation import message_overhead
from ..metrics import bootstrap, mean
from ..model import HyperLoRAModel

FIXTURE = Path(__file__).resolve().parent.parent / "bench" / "fixtures" / "memory_conversations.json"
CONDITIONS = ("none", "full", "truncated", "consolidated", "control")
_KEEP: list[tempfile.TemporaryDirectory] = []  # stores without --cache live as long as the run


def load_fixture(path: Path = FIXTURE) -> list[dict]:
    return json.loads(Path(path).read_text())["users"]


def messages_of(user: dict) -> list[dict[str, str]]:
    """The user's sessions as one message list: one memory across their threads."""
    return [dict(m) for session in user["sessions"] for m in session]


def build_memory(model: HyperLoRAModel, user: dict, config: MemoryConfig, cache: Path | None) -> dict:
    """The user's memory after every turn was added (resumed from ``cache`` when present).

    Messages are added one at a time; whenever a job is queued the worker finishes it before the
    next message (a worker that keeps up), then ``consolidate_now`` learns what is left outside
    the window, so the prompt holds the window only.
    """
    messages = messages_of(user)
    key = hashlib.sha256(f"{model.fingerprint}|{config.model_dump_json()}|{json.dumps(messages)}".encode()).hexdigest()[
        :16
    ]
    if cache is None:
        _KEEP.append(tempfile.TemporaryDirectory(prefix="hyperlora-eval-memory-"))
        directory = Path(_KEEP[-1].name)
    else:
        directory = cache / f"{user['id']}-{key}"
    store = AdapterStore(directory)
    memory = MemoryManager(model, store, config=config).memory(user["id"])
    have = [t.content for t in memory.turns()]
    if have != [m["content"] for m in messages[: len(have)]]:
        raise RuntimeError(f"{directory} holds another conversation; delete it")
    start = time.perf_counter()
    for message in messages[len(have) :]:
        memory.add_message(message["role"], message["content"])
        if store.pending(namespace=memory.namespace):
            memory.worker.drain()
    memory.consolidate_now()
    adapter = memory.adapter()
    status = memory.status()
    return {
        "memory": memory,
        "seconds": time.perf_counter() - start,
        # the last job's fit, and what it learned from (``warm_start_from``: the adapter it continued)
        "adapter": {
            **(adapter.metadata.model_extra.get("consolidation", {}) if adapter else {}),
            "memory": (adapter.metadata.model_extra.get("user_metadata") or {}).get("memory") if adapter else None,
        },
        "status": {"turns": status.turns, "window_turns": status.window_turns, "adapter_bytes": status.adapter_bytes},
    }


def answer(model: HyperLoRAModel, messages: list[dict], adapters: list, max_new_tokens: int, **extra) -> dict:
    start = time.perf_counter()
    chunk = model.complete(messages, adapters, max_new_tokens=max_new_tokens, **extra)
    return {"text": chunk.text, "prompt_tokens": chunk.prompt_tokens, "seconds": time.perf_counter() - start}


def _contains(gold: str, output: str) -> bool:
    return gold.lower() in output.lower()


def window_of(sizes: list[int], budget: int) -> int:
    """Index of the first message of the recent window: the rule of ``TurnLog.window_start``
    (newest messages within ``budget``, always at least one), for conversations not in a log."""
    start, used = len(sizes), 0
    for i in range(len(sizes) - 1, -1, -1):
        if start < len(sizes) and used + sizes[i] > budget:
            break
        start, used = i, used + sizes[i]
    return start


def latency_study(
    model: HyperLoRAModel,
    users: list[dict],
    memories: list[ConversationMemory],
    config: MemoryConfig,
    *,
    n_users: int,
    tokens: int,
    every: int,
    new_tokens: int,
    repeats: int = 2,
) -> list[dict]:
    """Seconds to answer one more message as the conversation grows, per condition.

    A conversation is the user's own turns followed by the other users' small talk (their last
    session) until ``tokens`` tokens. Every ``every`` messages the next user message is answered
    with exactly ``new_tokens`` new tokens under full history, the truncated window, and the
    window plus the user's memory adapter (the steady state: consolidation has caught up).
    The fastest of ``repeats`` runs is kept (the machine may be shared).
    """
    overhead = message_overhead(model)
    points = []
    for i in range(min(n_users, len(users))):
        filler = [m for j, u in enumerate(users) if j != i for m in u["sessions"][-1]]
        convo = messages_of(users[i])
        sizes = [model.count_tokens(m["content"]) + overhead for m in convo]
        k = 0
        while sum(sizes) < tokens and filler:
            convo.append(filler[k % len(filler)])
            sizes.append(model.count_tokens(convo[-1]["content"]) + overhead)
            k += 1
        adapters = memories[i].adapters()
        users_at = [t for t, m in enumerate(convo) if m["role"] == "user"]
        checkpoints = sorted(
            {next((u for u in users_at if u >= t), -1) for t in range(every, len(convo), every)} - {-1}
        )
        for t in tqdm(checkpoints, desc=f"latency {users[i]['id']}", unit="point"):
            history, current = convo[:t], convo[t]
            window = history[window_of(sizes[:t], config.recent_tokens) :]
            setups = {"full": (history, []), "truncated": (window, []), "consolidated": (window, adapters)}
            point = {"user": users[i]["id"], "turn": t, "history_tokens": sum(sizes[:t])}
            for name, (prefix, active) in setups.items():
                runs = [
                    answer(model, [*prefix, current], active, new_tokens, min_new_tokens=new_tokens)
                    for _ in range(repeats)
                ]
                point[f"seconds_{name}"] = min(r["seconds"] for r in runs)
                point[f"prompt_tokens_{name}"] = runs[0]["prompt_tokens"]
            points.append(point)
    return points


def evaluate(
    model: HyperLoRAModel,
    users: list[dict],
    config: MemoryConfig,
    *,
    max_new_tokens: int = 24,
    cache: Path | None = None,
    latency_users: int = 2,
    latency_tokens: int = 2048,
    latency_every: int = 6,
    latency_new_tokens: int = 16,
) -> dict:
    """Answer every question under every condition; rows, summary, latency points."""
    built = [build_memory(model, u, config, cache) for u in tqdm(users, desc="consolidating memories", unit="user")]
    memories = [b["memory"] for b in built]
    adapters = [m.adapters() for m in memories]
    rows = []
    for i, user in enumerate(tqdm(users, desc="answering", unit="user")):
        full = messages_of(user)
        window = memories[i].messages()
        window_text = " ".join(m["content"] for m in window).lower()
        for q in user["questions"]:
            ask = {"role": "user", "content": q["question"]}
            setups = {
                "none": ([ask], []),
                "full": ([*full, ask], []),
                "truncated": ([*window, ask], []),
                "consolidated": ([*window, ask], adapters[i]),
                "control": ([*window, ask], adapters[(i + 1) % len(users)] if len(users) > 1 else []),
            }
            row = {"user": user["id"], "question": q["question"], "answer": q["answer"]}
            row["in_window"] = q["answer"].lower() in window_text
            for name, (messages, active) in setups.items():
                out = answer(model, messages, active, max_new_tokens)
                row[f"out_{name}"] = out["text"]
                row[f"hit_{name}"] = float(_contains(q["answer"], out["text"]))
                row[f"prompt_tokens_{name}"] = out["prompt_tokens"]
                row[f"seconds_{name}"] = out["seconds"]
            rows.append(row)
    points = latency_study(
        model,
        users,
        memories,
        config,
        n_users=latency_users,
        tokens=latency_tokens,
        every=latency_every,
        new_tokens=latency_new_tokens,
    )
    return {
        "rows": rows,
        "summary": summarize(rows, points),
        "latency": points,
        "memories": {
            u["id"]: {k: b[k] for k in ("seconds", "adapter", "status")} for u, b in zip(users, built, strict=True)
        },
    }


def summarize(rows: list[dict], points: list[dict]) -> dict:
    """Answer rates (all questions; facts outside the window), the bar's ratio, prompt tokens,
    seconds per answer, and latency at the shortest and longest history."""
    out: dict = {"users": len({r["user"] for r in rows}), "questions": len(rows)}
    out["questions_out_of_window"] = sum(not r["in_window"] for r in rows)
    for label, subset in (("all", rows), ("out_of_window", [r for r in rows if not r["in_window"]])):
        by_user = {}
        for r in subset:
            by_user.setdefault(r["user"], []).append(r)
        rates = {c: [mean([r[f"hit_{c}"] for r in rs]) for rs in by_user.values()] for c in CONDITIONS}
        out[label] = {
            "answers_containing_gold": {
                c: f"{int(sum(r[f'hit_{c}'] for r in subset))}/{len(subset)}" for c in CONDITIONS
            },
            "answer_rate": {c: bootstrap([rates[c]], mean) for c in CONDITIONS},
            "consolidated_over_full": bootstrap(
                [rates["consolidated"], rates["full"]], lambda a, b: mean(a) / mean(b) if mean(b) > 0 else None
            ),
            "control_minus_truncated": bootstrap(
                [[c - t for c, t in zip(rates["control"], rates["truncated"], strict=True)]], mean
            ),
        }
    out["prompt_tokens"] = {c: mean([r[f"prompt_tokens_{c}"] for r in rows]) for c in CONDITIONS}
    out["seconds_per_answer"] = {c: mean([r[f"seconds_{c}"] for r in rows]) for c in CONDITIONS}
    if points:
        short, long = min(p["history_tokens"] for p in points), max(p["history_tokens"] for p in points)
        out["latency"] = {
            name: {
                "seconds_shortest": mean([p[f"seconds_{name}"] for p in points if p["history_tokens"] == short]),
                "seconds_longest": mean([p[f"seconds_{name}"] for p in points if p["history_tokens"] == long]),
                "prompt_tokens_longest": mean(
                    [p[f"prompt_tokens_{name}"] for p in points if p["history_tokens"] == long]
                ),
            }
            for name in ("full", "truncated", "consolidated")
        }
    return out


def plot_latency(points: list[dict], png: Path) -> bool:
    """Per-turn latency against conversation length; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    styles = {"full": "o-", "truncated": "s--", "consolidated": "^-"}
    for user in sorted({p["user"] for p in points}):
        mine = sorted((p for p in points if p["user"] == user), key=lambda p: p["history_tokens"])
        for name, style in styles.items():
            label = f"{name} history" if name == "full" else name
            ax.plot(
                [p["history_tokens"] for p in mine],
                [p[f"seconds_{name}"] for p in mine],
                style,
                label=label if user == points[0]["user"] else None,
                color={"full": "C3", "truncated": "C7", "consolidated": "C0"}[name],
                alpha=0.8,
                ms=4,
            )
    ax.set_xlabel("conversation length before the turn (tokens)")
    ax.set_ylabel("seconds per reply (fixed new tokens)")
    ax.set_title("Per-turn latency: full history vs consolidated memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora eval memory", description=__doc__.split("\n")[0])
    p.add_argument("--fixture", default=str(FIXTURE))
    p.add_argument("--limit", type=int, default=None, help="first N users only")
    p.add_argument("--base-model", default=None, help="HF id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=None, help="consolidation steps per job (default: the recipe's)")
    p.add_argument("--recent-tokens", type=int, default=128, help="recent-turn budget (the fixture's facts fall out)")
    p.add_argument("--job-tokens", type=int, default=384)
    p.add_argument("--min-job-tokens", type=int, default=192)
    p.add_argument("--replay-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--latency-users", type=int, default=2, help="users whose conversations are timed (0: none)")
    p.add_argument("--latency-tokens", type=int, default=2048, help="grow each timed conversation to this length")
    p.add_argument("--latency-every", type=int, default=6, help="time a reply every N messages")
    p.add_argument("--latency-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default="runs/memory-cache", help="memory stores, reused by reruns ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval_memory.json")
    p.add_argument("--plot", default=None, help="latency plot (default: OUT with .png)")
    return p.parse_args(argv)


def config_from_args(args, model: HyperLoRAModel) -> MemoryConfig:
    recipe = model.consolidation_config or ConsolidationConfig()
    if args.steps is not None:
        recipe = recipe.model_copy(update={"steps": args.steps})
    return MemoryConfig(
        recent_tokens=args.recent_tokens,
        job_tokens=args.job_tokens,
        min_job_tokens=args.min_job_tokens,
        replay_tokens=args.replay_tokens,
        consolidation=recipe,
        background=False,
        seed=args.seed,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = HyperLoRAModel.from_pretrained(args.base_model)
    config = config_from_args(args, model)
    users = load_fixture(Path(args.fixture))[: args.limit]
    result = evaluate(
        model,
        users,
        config,
        max_new_tokens=args.max_new_tokens,
        cache=Path(args.cache) if args.cache else None,
        latency_users=args.latency_users,
        latency_tokens=args.latency_tokens,
        latency_every=args.latency_every,
        latency_new_tokens=args.latency_new_tokens,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    result["plot"] = str(png) if result["latency"] and plot_latency(result["latency"], png) else None
    result["config"] = config.model_dump(mode="json")
    result["base_model"] = model.name
    result["threads"] = torch.get_num_threads()
    result["command"] = "hyperlora eval memory " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
