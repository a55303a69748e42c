"""Shared fixtures: a tiny random model of the default architecture with the real tokenizer.

The hypernetworks on it are freshly initialised and then given non-zero output scales, so the
adapters they emit really change the logits (an untrained net emits an exact zero delta).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (`make test`: two workers on two cores) each worker gets one thread, so the
# workers do not oversubscribe the cores; alone, a run uses up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def wait_idle(batcher, timeout: float = 10.0) -> None:
    """Wait until a ``BatchScheduler`` has no rows: the scheduler thread removes a row just after
    delivering its last token, so a caller can hold its whole answer a moment before that."""
    import time

    deadline = time.time() + timeout
    while batcher.active_rows and time.time() < deadline:
        time.sleep(0.01)


def make_tiny_model(seed: int = 0, chunk_len: int = 64):
    from hyperlora_integrations.testing import tiny_hyperlora_model

    return tiny_hyperlora_model(seed, chunk_len=chunk_len)


@pytest.fixture(scope="session")
def tiny_model():
    """One shared tiny HyperLoRAModel (read-only use; build your own to mutate)."""
    return make_tiny_model()


@pytest.fixture()
def fresh_tiny_model():
    return make_tiny_model()


@pytest.fixture()
def store(tmp_path):
    """A fresh on-disk AdapterStore, closed after the test."""
    from hyperlora_integrations.adapters import AdapterStore

    s = AdapterStore(tmp_path / "store")
    yield s
    s.close()
