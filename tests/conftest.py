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
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_model(seed: int = 0, chunk_len: int = 64):
    from hyperlora_integrations import HyperLoRAModel
    from hyperlora_integrations.hypernets import DocToLoRA, TextToLoRA
    from hyperlora_integrations.testing import tiny_base_model

    model = HyperLoRAModel(tiny_base_model(seed))
    torch.manual_seed(seed)
    d2l = DocToLoRA.for_model(model, chunk_len=chunk_len, latent_dim=32, num_latents=4, num_blocks=1)
    t2l = TextToLoRA.for_model(model, latent_dim=32, embed_dim=model.model.config.hidden_size)
    for net in (d2l, t2l):
        with torch.no_grad():
            for head in net.heads.values():
                head.b_scale.fill_(0.5)
        net.eval().requires_grad_(False)
    d2l.check_base(model)
    t2l.check_base(model)
    model.d2l, model.t2l = d2l, t2l
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """One shared tiny HyperLoRAModel (read-only use; build your own to mutate)."""
    return make_tiny_model()


@pytest.fixture()
def fresh_tiny_model():
    return make_tiny_model()
