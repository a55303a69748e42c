"""Tiny random base models and tokenizers, one per architecture family (fixture generation only).

Built from configs (no download): 3 decoder layers, hidden size 32, a byte-level BPE tokenizer
with the family's special tokens. The tokenizer is saved as ``PreTrainedTokenizerFast`` so that
transformers 4.x (their code) and 5.x (ours) read the same ``tokenizer.json`` the same way.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = """Sakana AI is a research lab in Tokyo. It studies nature-inspired methods for foundation
models, such as evolutionary model merging and hypernetworks that write adapters. The lab was
founded in 2023. Its name means fish in Japanese: a school of fish acts as one, though each
fish follows simple rules. Solve the math problem step by step and give the final answer.
Answer the question about the passage. Classify the sentiment of the review as positive or
negative. Translate the sentence into French. The quick brown fox jumps over the lazy dog.
"""

FAMILIES = {
    "gemma2": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "add_bos": True,
        # a plain template of the family's shape, for prompts in our engine (theirs loads its own)
        "template": "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == "
        "'assistant' else m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    },
    "qwen3": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "add_bos": False,
        "template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    },
    "mistral": {
        "specials": ["<unk>", "<s>", "</s>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": None,
        "add_bos": True,
        "template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + "
        "m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}{{ m['content'] + '\\n\\n' }}{% endif %}{% endfor %}",
    },
    "llama": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,
        "add_bos": True,
        "template": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    },
}


def make_tokenizer(family: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        model_max_length=4096,
        model_input_names=["input_ids", "attention_mask"],  # as the real ones: no token_type_ids
    )
    fast.chat_template = spec["template"]
    fast.save_pretrained(out)
    return fast


def make_model(family: str, vocab: int, out: Path, tokenizer) -> None:
    import torch
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
    )
    prefix = {"gemma2": "Gemma2", "qwen3": "Qwen3", "mistral": "Mistral", "llama": "Llama"}[family]
    config_cls = getattr(transformers, f"{prefix}Config")  # looked up lazily: 4.46 has no Qwen3
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(1234)
    model = model_cls(config_cls(**common)).eval()
    model.save_pretrained(out, safe_serialization=True)


def make_base(family: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(family, out)
    make_model(family, len(tok), out, tok)
