"""``hyperlora bench``: internalized adapters vs context stuffing vs KV reuse vs top-k RAG.

Seven conditions (see ``conditions``) answer the same held-out questions about the same
documents at several lengths, in one process; ``runner`` measures quality, latency and memory,
``report`` writes ``report.md`` and plots. ``docs/benchmarks.md`` explains how to read them.
"""

from .cli import main

__all__ = ["main"]
