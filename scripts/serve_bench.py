"""Throughput of ``hyperlora serve`` and ``hyperlora ingest`` on this machine (docs/serving.md).

Starts a single-machine Ray (``--num-cpus``), deploys the app with the default model (or
``--tiny``), internalizes four documents over HTTP, then sends ``--requests`` chat requests at
each concurrency level, half to the base model and half spread over the four adapters, and
reports requests/s and completion tokens/s; finally ingests ``--ingest`` generated documents on
Ray Data. Prints one JSON object (also written to ``--out``).

    .venv/bin/python scripts/serve_bench.py --out docs/results/serve_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = [
    "The Vellmoor observatory was founded in 1911 by the astronomer Ilse Marran.",
    "Tessaly harbour freezes every February; ferries then run from Brask instead.",
    "The Quell river flows north for 412 kilometres before reaching the Amber Sea.",
    "Orsolya Denes has kept the Vell island lighthouse since 1987.",
]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ingest", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import ray

    from hyperlora_integrations.serving import ModelSpec, ServeConfig, ingest, server

    work = Path(tempfile.mkdtemp(prefix="hlbench"))
    spec = ModelSpec(tiny=args.tiny, num_threads=1)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(store=str(work / "store"), model=spec, replica_num_cpus=1, max_ongoing_requests=8)
    url = server.start(config, port=port)
    result: dict = {"model": "tiny" if args.tiny else "default (SmolLM2-135M-Instruct)", "num_cpus": args.num_cpus}
    result["startup_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_at_start"] = os.getloadavg()
    try:
        t = time.perf_counter()
        ids = post(f"{url}/documents", {"documents": [{"text": d} for d in DOCS]})["ids"]
        result["documents_post_s"] = round(time.perf_counter() - t, 2)
        base = json.loads(urllib.request.urlopen(f"{url}/models").read())["data"][0]["id"]
        models = [base, ids[0], base, ids[1], base, ids[2], base, ids[3]]

        def one(i: int) -> int:
            body = {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": f"Question {i}: what does the document say?"}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            return post(f"{url}/chat/completions", body)["usage"]["completion_tokens"]

        one(0)  # warm: first adapter loads, first forward pass
        runs = []
        for c in args.concurrency:
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                tokens = sum(pool.map(one, range(args.requests)))
            dt = time.perf_counter() - t
            runs.append(
                {
                    "concurrency": c,
                    "requests": args.requests,
                    "seconds": round(dt, 2),
                    "requests_per_s": round(args.requests / dt, 3),
                    "completion_tokens_per_s": round(tokens / dt, 1),
                }
            )
        result["chat"] = runs
        corpus = work / "corpus"
        corpus.mkdir()
        for i in range(args.ingest):
            (corpus / f"n{i}.txt").write_text(f"Field note {i}: station {i} logged {i * 37 % 101} birds.", "utf-8")
        server.stop()  # free the replica's CPU for the ingest actor
        report = ingest([corpus], work / "store", spec=spec, batch_size=4, progress=False)
        result["ingest"] = report.model_dump(exclude={"nodes", "failed"})
    finally:
        ray.shutdown()
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
