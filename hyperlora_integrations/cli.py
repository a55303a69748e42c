"""``hyperlora``: demo, train, eval, bench, export, drain.

Subcommands import their modules lazily so ``hyperlora --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


def _demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hyperlora demo", description="Answer questions about a built-in document three ways."
    )
    p.add_argument("--base-model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    from .demo import run

    run(args.base_model, args.max_new_tokens)
    return 0


def _train(argv: list[str]) -> int:
    if not argv or argv[0] not in ("d2l", "t2l"):
        print("usage: hyperlora train {d2l,t2l} [options]  (see --help of each)", file=sys.stderr)
        return 2
    if argv[0] == "d2l":
        from .training.train_d2l import main
    else:
        from .training.train_t2l import main
    main(argv[1:])
    return 0


def _eval(argv: list[str]) -> int:
    if not argv or argv[0] not in ("d2l", "t2l", "long"):
        print("usage: hyperlora eval {d2l,t2l,long} [options]", file=sys.stderr)
        return 2
    if argv[0] == "d2l":
        from .training.eval_d2l import main
    elif argv[0] == "t2l":
        from .training.eval_t2l import main
    else:
        from .bench.long_document import main
    main(argv[1:])
    return 0


def _bench(argv: list[str]) -> int:
    from .bench.cli import main

    return main(argv)


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hyperlora export", description="Internalize a text file and save the adapter in PEFT format."
    )
    p.add_argument("document", help="path of a UTF-8 text file")
    p.add_argument("out", help="output directory (PEFT adapter)")
    p.add_argument("--base-model", default=None)
    p.add_argument("--d2l", default="default", help="Doc-to-LoRA checkpoint directory")
    args = p.parse_args(argv)
    from pathlib import Path

    from .model import HyperLoRAModel

    model = HyperLoRAModel.from_pretrained(args.base_model, d2l=args.d2l, t2l=None)
    text = Path(args.document).read_text(encoding="utf-8")
    adapter = model.internalize(text, source=args.document, progress=True)
    path = model.export_adapter(adapter, args.out)
    print(f"wrote {adapter} to {path}")
    return 0


def _drain(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hyperlora drain", description="Finish a store's queued background internalizations now, with progress."
    )
    p.add_argument("store", help="AdapterStore directory")
    p.add_argument("--base-model", default=None)
    p.add_argument("--d2l", default="default")
    p.add_argument("--t2l", default="default")
    p.add_argument("--timeout", type=float, default=None, help="seconds before giving up (default: none)")
    args = p.parse_args(argv)
    from .adapters import AdapterStore
    from .adapters.worker import drain
    from .model import HyperLoRAModel

    model = HyperLoRAModel.from_pretrained(args.base_model, d2l=args.d2l, t2l=args.t2l)
    done = drain(AdapterStore(args.store), model=model, progress=True, timeout=args.timeout)
    print(f"finished {done} queued jobs")
    return 0


def _serve(argv: list[str]) -> int:
    from .serving.cli import serve_main

    return serve_main(argv)


def _ingest(argv: list[str]) -> int:
    from .serving.cli import ingest_main

    return ingest_main(argv)


def _import(argv: list[str]) -> int:
    from .hypernets.sakana_import import main

    return main(argv)


COMMANDS = {
    "demo": _demo,
    "train": _train,
    "eval": _eval,
    "bench": _bench,
    "export": _export,
    "drain": _drain,
    "serve": _serve,
    "ingest": _ingest,
    "import": _import,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: hyperlora {" + ",".join(COMMANDS) + "} [options]\n")
        print("  demo    answer questions about a built-in document: no doc / doc in prompt / adapter")
        print("  train   train a hypernetwork: `train d2l` (Doc-to-LoRA) or `train t2l` (Text-to-LoRA)")
        print("  eval    evaluate on held-out data: `eval d2l`, `eval t2l`, `eval long` (32k-token document)")
        print("  bench   adapters vs context stuffing vs KV reuse vs top-k RAG (quality, latency, memory)")
        print("  export  internalize a text file and save the adapter in PEFT format")
        print("  drain   finish a store's queued background internalizations, with a progress bar")
        print("  serve   OpenAI-compatible HTTP API on Ray Serve, adapters per request (extra [serve])")
        print("  ingest  internalize a corpus (text/JSONL/parquet) into a store on Ray Data (extra [serve])")
        print("  import  convert Sakana's released hypernetworks: `import sakana-d2l PATH OUT`, `import sakana-t2l DIR OUT`")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
