"""Start and stop the OpenAI-compatible application (``hyperlora serve`` and scripts)."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

from ..errors import HyperLoRAError
from ._ray import ensure_ray
from .config import ServeConfig

APP_NAME = "hyperlora"


def start(
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
    timeout: float = 300.0,
) -> str:
    """Deploy ``config`` on Ray Serve and return the base URL (``http://host:port/v1``) once it answers.

    ``address=None`` starts a single-machine Ray; ``"auto"`` joins the cluster ``ray start`` made.
    """
    ensure_ray(address, num_cpus=num_cpus)
    from ray import serve

    from .app import build_app

    try:
        serve.start(http_options={"host": host, "port": port})
    except TimeoutError:
        # Ray waits a fixed 60 s for its HTTP proxy; on a loaded machine the proxy is still starting
        # then. The controller exists, so a second start connects to it, and the /health poll below
        # waits for the proxy within our own ``timeout``.
        serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while True:  # serve.run returns when replicas are up; the proxy may need a moment more
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                if r.status == 200:
                    return f"{url}/v1"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise HyperLoRAError(f"the server did not answer on {url}/health within {timeout:.0f} s; see Ray's logs")
        time.sleep(0.5)


def stop() -> None:
    """Tear the application and Serve down (Ray itself stays connected)."""
    from ray import serve

    serve.shutdown()


def serve_forever(config: ServeConfig, **kwargs) -> None:
    """``start``, then block until SIGINT/SIGTERM, then ``stop``."""
    url = start(config, **kwargs)
    print(f"hyperlora: OpenAI-compatible API at {url} (store {config.store}); Ctrl-C stops", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()
