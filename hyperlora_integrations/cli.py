"""``hyperlora``: demo, train, eval, bench, export, drain, serve, ingest, import.

Subcommands import their modules lazily (and the package imports torch lazily), so
``hyperlora --help`` and ``--version`` are instant. A mistake the user can fix (a missing or
unreadable input, a bad argument, a ``HyperLoRAError``) is one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

PROG = "hyperlora"


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return code


def _version() -> str:
    """The installed distribution's version, read without importing the package's dependencies."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hyperlora-integrations")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _kinds_help(command: str, kinds: dict[str, str]) -> str:
    width = max(map(len, kinds))
    lines = [f"usage: {PROG} {command} {{{','.join(kinds)}}} [options]", ""]
    lines += [f"  {kind:<{width}}  {text}" for kind, text in kinds.items()]
    lines += ["", f"`{PROG} {command} KIND --help` lists the options of each."]
    return "\n".join(lines)


def _dispatch(command: str, argv: list[str], kinds: dict[str, str]) -> str | int:
    """The chosen kind, or an exit code after printing help (0) or an error (2)."""
    if argv and argv[0] in ("-h", "--help"):
        print(_kinds_help(command, kinds))
        return 0
    if not argv or argv[0] not in kinds:
        print(_kinds_help(command, kinds), file=sys.stderr)
        given = f"unknown kind {argv[0]!r}" if argv else "which one?"
        close = difflib.get_close_matches(argv[0], kinds, n=1) if argv else []
        return _fail(command, given + (f" (did you mean {close[0]!r}?)" if close else ""))
    return argv[0]


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


TRAIN_KINDS = {
    "d2l": "train a Doc-to-LoRA hypernetwork (documents -> adapters)",
    "t2l": "train a Text-to-LoRA hypernetwork (task descriptions -> adapters)",
}
EVAL_KINDS = {
    "d2l": "Doc-to-LoRA on held-out questions (NLL gap closed, token F1, mismatched control)",
    "t2l": "Text-to-LoRA on held-out tasks (task metric vs description in the prompt)",
    "long": "internalize a 32k-token document with the fact in its last chunk (memory, latency)",
    "fictional": "consolidation on fictional documents: no doc / in prompt / instant / consolidated / mismatched",
    "memory": "long-term memory on held-out conversations: none / full / truncated / consolidated / other user's",
}


def _train(argv: list[str]) -> int:
    kind = _dispatch("train", argv, TRAIN_KINDS)
    if isinstance(kind, int):
        return kind
    if kind == "d2l":
        from .training.train_d2l import main
    else:
        from .training.train_t2l import main
    main(argv[1:])
    return 0


def _eval(argv: list[str]) -> int:
    kind = _dispatch("eval", argv, EVAL_KINDS)
    if isinstance(kind, int):
        return kind
    if kind == "d2l":
        from .training.eval_d2l import main
    elif kind == "t2l":
        from .training.eval_t2l import main
    elif kind == "fictional":
        from .training.eval_fictional import main
    elif kind == "memory":
        from .training.eval_memory import main
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
    # Check the inputs before loading the model (seconds): a typo costs one line, not a traceback.
    text = _read_document(args.document)
    if isinstance(text, int):
        return text
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail("export", f"{out} exists and is not a directory")
    if args.d2l != "default" and not Path(args.d2l).is_dir():
        return _fail("export", f"--d2l {args.d2l}: no such checkpoint directory")
    from .model import HyperLoRAModel

    model = HyperLoRAModel.from_pretrained(args.base_model, d2l=args.d2l, t2l=None)
    if model.d2l is None:
        hint = f"pass --d2l DIR (train one with `{PROG} train d2l`)"
        return _fail("export", f"no Doc-to-LoRA checkpoint for {model.name}: {hint}", 1)
    adapter = model.internalize(text, source=args.document, progress=True)
    path = model.export_adapter(adapter, args.out)
    print(f"wrote {adapter} to {path}")
    return 0


def _read_document(name: str) -> str | int:
    """The document's text, or an exit code after one line saying what is wrong with it."""
    path = Path(name)
    if not path.exists():
        return _fail("export", f"{name}: no such file")
    if not path.is_file():
        return _fail("export", f"{name}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return _fail("export", f"{name}: not UTF-8 text (byte {exc.start}); convert it, e.g. with iconv")
    except OSError as exc:
        return _fail("export", f"{name}: cannot read it ({exc.strerror})")
    if not text.strip():
        return _fail("export", f"{name}: the document is empty")
    return text


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


def _consolidate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hyperlora consolidate",
        description="Consolidate a store's documents now (queued consolidations, or --all instant adapters), "
        "with progress; or one text file into a PEFT adapter with --file.",
    )
    p.add_argument("store", nargs="?", help="AdapterStore directory")
    p.add_argument("--namespace", default=None, help="only this namespace (with --all)")
    p.add_argument("--all", action="store_true", help="also queue every stored document not consolidated yet")
    p.add_argument("--file", default=None, help="a text file to consolidate into OUT (PEFT format)")
    p.add_argument("--out", default=None, help="output directory for --file")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--base-model", default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds before giving up (default: none)")
    args = p.parse_args(argv)
    if (args.store is None) == (args.file is None):
        return _fail("consolidate", "give a STORE directory, or --file TEXT --out DIR")
    if args.file is not None:
        if args.out is None:
            return _fail("consolidate", "--file needs --out DIR")
        text = _read_document(args.file)
        if isinstance(text, int):
            return text
    elif not Path(args.store).is_dir():
        return _fail("consolidate", f"no store at {args.store!r}")
    from .model import HyperLoRAModel

    model = HyperLoRAModel.from_pretrained(args.base_model)
    if args.file is not None:
        adapter = model.consolidate(text, steps=args.steps, progress=True, source=args.file)
        print(f"consolidated -> {model.export_adapter(adapter, args.out)}")
        return 0
    from .adapters import AdapterStore
    from .adapters.worker import drain

    store = AdapterStore(args.store)
    if args.all:
        spaces = [args.namespace] if args.namespace else store.namespaces()
        queued = 0
        for ns in spaces:
            for meta in store.list(namespace=ns, kind="document"):
                text = store.text(meta.id, namespace=ns)
                if text and not (meta.model_extra or {}).get("consolidated"):
                    queued += store.enqueue(
                        "consolidate",
                        meta.id,
                        text,
                        namespace=ns,
                        fingerprint=model.fingerprint,
                        options={
                            "source": meta.source,
                            "user_metadata": (meta.model_extra or {}).get("user_metadata", {}),
                        },
                    )
        print(f"queued {queued} documents for consolidation")
    done = drain(store, model=model, progress=True, timeout=args.timeout)
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
    "consolidate": _consolidate,
    "serve": _serve,
    "ingest": _ingest,
    "import": _import,
}


USAGE = f"""usage: {PROG} [--version] {{{",".join(COMMANDS)}}} [options]

  demo    answer questions about a built-in document: no doc / doc in prompt / adapter
  train   train a hypernetwork: `train d2l` (Doc-to-LoRA) or `train t2l` (Text-to-LoRA)
  eval    evaluate on held-out data: `eval d2l`, `eval t2l`, `eval long` (32k-token document), `eval memory`
  bench   adapters vs context stuffing vs KV reuse vs top-k RAG (quality, latency, memory)
  export  internalize a text file and save the adapter in PEFT format
  drain   finish a store's queued background internalizations, with a progress bar
  consolidate  learn a store's documents (or --file TEXT) into their adapters now, with progress
  serve   OpenAI-compatible HTTP API on Ray Serve, adapters per request (extra [serve])
  ingest  internalize a corpus (text/JSONL/parquet) into a store on Ray Data (extra [serve])
  import  convert Sakana's released hypernetworks: `import sakana-d2l PATH OUT`, `import sakana-t2l DIR OUT`

`{PROG} COMMAND --help` lists the options of each."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"{PROG} {_version()}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print(USAGE, file=sys.stderr)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"{PROG}: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    from .errors import HyperLoRAError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except HyperLoRAError as exc:  # the user's to fix: one line, no traceback
        return _fail(argv[0], str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 1)


if __name__ == "__main__":
    raise SystemExit(main())
