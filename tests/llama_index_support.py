"""Helpers for the LlamaIndex tests: observe what really reaches the model.

``CoreCallSpy`` records every ``HyperLoRAModel.stream_chunks`` call (the messages after
reference resolution, the adapters, the thread). ``ActiveLoRARecorder`` reads the LoRA weights
that are active during each forward pass of the base model, straight from the injector's
context variable, so a test can prove which adapters were applied, not just which were passed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from hyperlora_integrations.lora import Adapter, concat
from hyperlora_integrations.lora.layer import active_weights

FACTS = {
    "zorblax": "The Zorblax lantern festival is held in the town of Quendor every ninth of March.",
    "vellic": "Mount Vellic, the highest peak of the Arnath range, rises 5,120 meters above sea level.",
    "mirelle": "Captain Mirelle Oduya commanded the research vessel Halcyon Drift during the 2031 survey.",
}


@dataclass
class CoreCall:
    messages: list[dict[str, str]]
    adapter_ids: list[str]
    thread: int
    kwargs: dict[str, Any]


@dataclass
class CoreCallSpy:
    calls: list[CoreCall] = field(default_factory=list)

    def install(self, monkeypatch, model) -> CoreCallSpy:
        original = model.stream_chunks

        def spy(prompt, adapters=(), **kwargs):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            self.calls.append(CoreCall(messages, [a.id for a in adapters], threading.get_ident(), dict(kwargs)))
            return original(prompt, adapters, **kwargs)

        monkeypatch.setattr(model, "stream_chunks", spy)
        return self

    def prompt_text(self, index: int = -1) -> str:
        return "\n".join(m["content"] for m in self.calls[index].messages)


class ActiveLoRARecorder:
    """Context manager recording the active LoRA weights at every forward of ``model.model``."""

    def __init__(self, model) -> None:
        self.model = model
        self.seen: list[Any] = []
        self._handle = None

    def __enter__(self) -> ActiveLoRARecorder:
        def record(module, args) -> None:
            # Background consolidation (retrievers and indexes of earlier tests on the shared
            # model) trains in the store's worker threads: not the call under test.
            if threading.current_thread().name != "hyperlora-worker":
                self.seen.append(active_weights())

        self._handle = self.model.model.register_forward_pre_hook(record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def assert_exactly(self, adapters: list[Adapter]) -> None:
        """Every recorded forward ran with exactly ``adapters`` (rank-concatenated, in order)."""
        assert self.seen, "the model never ran"
        if not adapters:
            assert all(w is None for w in self.seen), "adapters were active where none should be"
            return
        combined = concat(adapters) if len(adapters) > 1 else adapters[0]
        A, B = combined.folded()
        for weights in self.seen:
            assert weights is not None, "a forward pass ran without the expected adapters"
            assert set(weights.A) == set(A)
            for name in A:
                assert torch.equal(weights.A[name], A[name]) and torch.equal(weights.B[name], B[name])
