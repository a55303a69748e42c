"""Serving and scale-out: an OpenAI-compatible HTTP API on Ray Serve, and bulk ingest on Ray Data.

``engine`` (framework-free: what a replica does per request), ``schemas`` (OpenAI bodies and
errors), ``app`` (the Ray Serve deployments; imports Ray), ``ingest`` (Ray Data), ``server``
(start/stop for the CLI and scripts). Ray is imported only by ``app``, ``server`` and the
functions that need it, so ``import hyperlora_integrations.serving`` works without the extra.
"""

from .config import ServeConfig
from .engine import Plan, ServingEngine, Target
from .ingest import IngestReport, ingest, read_corpus
from .schemas import ContextLengthExceededError, RequestTooLargeError
from .spec import ModelSpec

__all__ = [
    "ContextLengthExceededError",
    "IngestReport",
    "ModelSpec",
    "Plan",
    "RequestTooLargeError",
    "ServeConfig",
    "ServingEngine",
    "Target",
    "ingest",
    "read_corpus",
]
