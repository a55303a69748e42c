"""``hyperlora serve`` and ``hyperlora ingest``: argument parsing (the top-level CLI delegates here)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import HyperLoRAError
from .spec import ModelSpec


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--d2l", default="default", help="Doc-to-LoRA checkpoint directory ('default': the shipped one)")
    p.add_argument("--t2l", default="default", help="Text-to-LoRA checkpoint directory")
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke tests; answers are gibberish)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica/actor")
    p.add_argument("--address", default=None, help="Ray cluster to join ('auto': the one `ray start` made)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a Ray started here (default: all)")


def _spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(base_model=args.base_model, d2l=args.d2l, t2l=args.t2l, tiny=args.tiny, num_threads=args.threads)


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hyperlora serve",
        description="OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /v1/documents) on Ray Serve.",
    )
    p.add_argument("--store", required=True, help="AdapterStore directory (created if missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _model_args(p)
    p.add_argument(
        "--namespace", action="append", default=None, help="served namespace (repeatable; first gets documents)"
    )
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each model replica reserves")
    p.add_argument("--max-adapters", type=int, default=16, help="adapters each replica keeps loaded (LRU)")
    p.add_argument("--max-ongoing", type=int, default=8, help="requests decoded at once per replica")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens when a request sets no max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--store-resource", default=None, help="custom Ray resource of the node holding the store")
    p.add_argument(
        "--no-select-adapters",
        action="store_true",
        help="activate every referenced adapter (default: only those that make the question more likely)",
    )
    args = p.parse_args(argv)
    from pydantic import ValidationError

    from .config import ServeConfig
    from .server import serve_forever

    try:
        config = ServeConfig(
            store=args.store,
            model=_spec(args),
            namespaces=args.namespace or ["default", "skills"],
            num_replicas=args.replicas,
            replica_num_cpus=args.replica_cpus,
            max_adapters_per_replica=args.max_adapters,
            max_ongoing_requests=args.max_ongoing,
            default_max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            store_resource=args.store_resource,
            select_adapters=not args.no_select_adapters,
        )
    except ValidationError as exc:
        print(f"hyperlora serve: bad options: {exc}", file=sys.stderr)
        return 2
    try:
        serve_forever(config, host=args.host, port=args.port, address=args.address, num_cpus=args.num_cpus)
    except HyperLoRAError as exc:
        print(f"hyperlora serve: {exc}", file=sys.stderr)
        return 1
    return 0


def ingest_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hyperlora ingest",
        description="Internalize a corpus into a store on Ray Data (resumable: stored documents are skipped).",
    )
    p.add_argument("corpus", nargs="+", help="files or directories: .txt/.md (one document each), .jsonl, .parquet")
    p.add_argument("--store", required=True, help="AdapterStore directory (created if missing)")
    p.add_argument("--namespace", default="default")
    _model_args(p)
    p.add_argument("--consolidate", choices=["now"], default=None, help="also consolidate each document (slow)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1, help="internalizing actors (each loads the model)")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    args = p.parse_args(argv)
    from ._ray import ensure_ray
    from .ingest import _files, ingest

    try:
        _files(args.corpus)  # a wrong path fails here, before Ray starts
        ensure_ray(args.address, num_cpus=args.num_cpus, log_to_driver=False)
        report = ingest(
            args.corpus,
            args.store,
            spec=_spec(args),
            namespace=args.namespace,
            consolidate=args.consolidate,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            num_cpus=args.actor_cpus,
        )
    except HyperLoRAError as exc:
        print(f"hyperlora ingest: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.model_dump(), indent=1))
    return 1 if report.failed else 0
