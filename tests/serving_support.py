"""Helpers of the Ray Serve tests: free ports, HTTP calls, store snapshots, expected answers."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The adapters of the served tiny model must change greedy output visibly (see test_serving_engine).
SPEC = {"tiny": True, "tiny_adapter_scale": 20.0, "num_threads": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: Any, *, raw: bytes | None = None, timeout: float = 120) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def get(url: str, timeout: float = 60) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def sse_events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def snapshot(store_dir) -> tuple:
    """Everything a request could change in a store: rows, jobs and blob files."""
    from hyperlora_integrations.adapters import AdapterStore

    with AdapterStore(store_dir) as store:
        rows = []
        for ns in store.namespaces():
            rows += [(ns, m.model_dump_json()) for m in store.list(namespace=ns)]
        jobs = [(j.namespace, j.id, j.state) for j in store.jobs(states=("queued", "running", "failed"))]
        files = sorted(str(p.relative_to(store.path)) for p in (store.path / "blobs").rglob("*"))
    return rows, jobs, files


def _children() -> set[int]:
    """Pids of this process's direct children (Linux /proc; empty elsewhere)."""
    me, out = str(os.getpid()), set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.add(int(entry))
            except (OSError, IndexError):
                pass
    return out


def start_local_ray(num_cpus: int = 2, attempts: int = 3):
    """``ray.init`` of a single-machine Ray, retried: Ray gives its raylet a fixed 30 s to
    register, which a machine shared with other busy processes can miss. The processes a failed
    attempt started (this process's new children) are killed before the next one."""
    import signal

    import ray

    from hyperlora_integrations.serving._ray import ray_environment

    ray_environment()
    for attempt in range(attempts):
        before = _children()
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return ray
        except Exception as exc:  # "The current node timed out during startup"
            ray.shutdown()
            for pid in _children() - before:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if attempt == attempts - 1 or "timed out" not in str(exc):
                raise
    raise AssertionError("unreachable")
