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
