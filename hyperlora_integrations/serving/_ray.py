"""Connecting to Ray the same way from the CLI, ``serve`` and ``ingest``."""

from __future__ import annotations

import os

from .._optional import require


def ray_environment() -> None:
    """Environment for a Ray this package starts; set before ``ray.init`` (the local cluster
    inherits the driver's environment), never overriding what the user set.

    Usage statistics are off: the machines this runs on are often offline. Serve's proxy must
    answer a readiness check within 5 s by default; on a busy 2-core machine (a model loading
    next to it) it missed three in a row and Serve gave up on it (``ActorDiedError`` from
    ``serve.start``), so the limits are raised.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True):
    """Return the ``ray`` module, connected: to ``address`` (``"auto"``: the local cluster that
    ``ray start`` made) or, without one, to a new single-machine instance.

    The dashboard is off: it costs a process and a port nobody asked for. An already-connected driver
    (a test's fixture, a notebook) is reused as it is.
    """
    ray_environment()
    ray = require("ray", "serve")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    return ray
