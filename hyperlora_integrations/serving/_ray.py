"""Connecting to Ray the same way from the CLI, ``serve`` and ``ingest``."""

from __future__ import annotations

import os

from .._optional import require


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True):
    """Return the ``ray`` module, connected: to ``address`` (``"auto"``: the local cluster that
    ``ray start`` made) or, without one, to a new single-machine instance.

    Usage statistics and the dashboard are off: the machines this runs on are often offline,
    and the dashboard costs a process and a port nobody asked for. An already-connected driver
    (a test's fixture, a notebook) is reused as it is.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require("ray", "serve")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    return ray
