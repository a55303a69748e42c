"""The multi-node path: ``ray start --head`` plus a worker node, two processes on this machine.

The head holds the store (custom resource ``hyperlora_store``: serving replicas go there); the
worker node has the ``ingest`` resource, so Ray Data's internalizing actors run on the other node
and their adapters come back to the driver, the store's one writer. Then the application is
deployed on the cluster and answers with an ingested document's adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the [serve] extra (ray[serve]) is not installed")
# Opt-in: in the lead's last full run (2 cores) the two-node ingest hung in Dataset.materialize for
# over 10 minutes after passing earlier in the session; until that is understood it must not be
# able to stall CI. Run it with HYPERLORA_RAY_CLUSTER_TESTS=1 (docs/serving.md).
pytestmark = pytest.mark.skipif(
    os.environ.get("HYPERLORA_RAY_CLUSTER_TESTS") != "1",
    reason="two-node Ray cluster test is opt-in (HYPERLORA_RAY_CLUSTER_TESTS=1): it hung once on 2 cores",
)

from serving_support import SPEC, free_port, get, post  # noqa: E402

from hyperlora_integrations.adapters import AdapterStore, document_id  # noqa: E402
from hyperlora_integrations.serving import ModelSpec, ServeConfig, ingest  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# `ray start` turns token authentication on unless told otherwise, and this driver's Ray (imported
# at collection, before any fixture runs) reads its mode once: a throw-away cluster on this machine
# runs without tokens so that the driver need not be started with RAY_AUTH_MODE=token.
CLUSTER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, so teardown stops exactly its processes."""
    env = {**os.environ, **CLUSTER_ENV}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the node's process group (a node drains for up to 30 s; nothing here needs that),
    then SIGKILL whatever of the group is left, even when ``ray start`` itself has exited."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)


def _node(args: list[str], log: Path, up, what: str, procs: list) -> None:
    """Start a node and wait until ``up()``; once more if it died (Ray gives a raylet a fixed 30 s
    to register, which a machine shared with other busy processes can miss)."""
    for attempt in range(2):
        proc = _start(args, log)
        procs.append(proc)
        deadline = time.monotonic() + 180
        while not up():
            if proc.poll() is not None:
                break
            assert time.monotonic() < deadline, f"{what} did not come up in 180 s"
            time.sleep(2)
        else:
            return
        assert attempt == 0, f"{what} failed twice:\n" + log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def cluster():
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="hlray", dir="/tmp")  # short: Ray's socket paths have a length limit
    logs = Path(temp)
    env = {**os.environ, **CLUSTER_ENV}

    def head_up() -> bool:
        status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, timeout=60, env=env)
        return status.returncode == 0

    def worker_up() -> bool:
        return len([n for n in ray.nodes() if n["Alive"]]) >= 2

    procs: list[subprocess.Popen] = []
    try:
        head_args = [
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--resources=" + json.dumps({"hyperlora_store": 1}),
        ]
        _node(head_args, logs / "head.log", head_up, "the ray head", procs)
        ray.init(address=address, log_to_driver=False)
        worker_args = [
            f"--address={address}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--resources=" + json.dumps({"ingest": 1}),
        ]
        _node(worker_args, logs / "worker.log", worker_up, "the worker node", procs)
        yield ray
    finally:
        ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_ingest_on_the_worker_node_then_serve_on_the_head(cluster, tmp_path):
    from hyperlora_integrations.serving import server as serving_server

    ray = cluster
    head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "hyperlora_store" in n["Resources"])
    store_dir = tmp_path / "store"
    corpus = tmp_path / "corpus.jsonl"
    texts = [
        f"Cluster note {i}: shelf {i * 7 % 13} holds the {'red blue green'.split()[i % 3]} box." for i in range(20)
    ]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    spec = ModelSpec(**SPEC)
    report = ingest([corpus], store_dir, spec=spec, num_cpus=0.5, resources={"ingest": 0.5}, progress=False)
    assert (report.total, report.written, report.failed) == (20, 20, {})
    assert report.nodes and head_id not in report.nodes  # the adapters were made on the other node

    config = ServeConfig(
        store=str(store_dir), model=spec, replica_num_cpus=0.25, store_resource="hyperlora_store", max_prompt_tokens=256
    )
    url = serving_server.start(config, port=free_port())
    try:
        target = document_id("default", texts[3])
        assert target in {card["id"] for card in get(f"{url}/models")["data"]}
        question = "Which box is on shelf 8?"
        status, body = post(
            f"{url}/chat/completions",
            {"model": target, "messages": [{"role": "user", "content": question}], "max_tokens": 8},
        )
        assert status == 200, body
        with AdapterStore(store_dir) as store:
            want = spec.load().generate(question, [store.get(target)], max_new_tokens=8)
        assert body["choices"][0]["message"]["content"] == want
    finally:
        serving_server.stop()
