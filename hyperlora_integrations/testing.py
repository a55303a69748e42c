"""A tiny random model with the default model's architecture and real tokenizer.

Used by the test suite and by ``hyperlora bench --quick --tiny`` so the whole pipeline runs in
seconds on two cores. Its outputs are meaningless; its shapes, tokenizer and code paths are real.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .base_model import BaseModel, default_model_dir, freeze

TINY_NAME = "tiny-random-llama"


def tiny_base_model(seed: int = 0, *, layers: int = 2, hidden: int = 64) -> BaseModel:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY_NAME
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=freeze(model), tokenizer=tokenizer, name=TINY_NAME)


def tiny_hyperlora_model(seed: int = 0, *, chunk_len: int = 64):
    """The tiny base model plus random D2L/T2L hypernets whose adapters are non-zero.

    An untrained head emits an exact zero delta (its B scale starts at 0), which would make
    "the right adapter is active" untestable; here the scales are set to 0.5. Answers are
    gibberish, every code path is real.
    """
    from .hypernets import DocToLoRA, TextToLoRA
    from .model import HyperLoRAModel

    model = HyperLoRAModel(tiny_base_model(seed))
    torch.manual_seed(seed)
    d2l = DocToLoRA.for_model(model, chunk_len=chunk_len, latent_dim=32, num_latents=4, num_blocks=1)
    t2l = TextToLoRA.for_model(model, latent_dim=32, embed_dim=model.model.config.hidden_size)
    for net in (d2l, t2l):
        with torch.no_grad():
            for head in net.heads.values():
                head.b_scale.fill_(0.5)
        net.eval().requires_grad_(False)
    model.d2l, model.t2l = d2l, t2l
    # Background consolidation runs whenever a retriever adds documents; on this model its
    # numbers are meaningless, so keep it to a few short steps (the code path stays the same).
    from .consolidation import ConsolidationConfig

    model.consolidation_config = ConsolidationConfig(steps=4, batch_size=2, max_seq_tokens=64, lr=2e-2)
    return model
