"""How Sakana's Doc-to-LoRA wraps documents, per family (their ids are checked in test_sakana_d2l)."""

from __future__ import annotations

import pytest
from sakana_support import FIXTURES, expected
from transformers import AutoTokenizer

from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.hypernets.sakana_templates import affix_ids, document_ids, split_chunks

BASES = {"gemma2": "gemma-2-2b-it", "qwen3": "Qwen3-4B-Instruct-2507", "mistral": "Mistral-7B-Instruct-v0.2"}
RENDERED = {  # their template with [system "", user doc] and a generation prompt
    "gemma2": "<bos><start_of_turn>user\n\n\n{doc}<end_of_turn>\n<start_of_turn>model\n",
    "qwen3": "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{doc}<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "<s> [INST] \n\n{doc} [/INST] ",
}


def tokenizer(family: str):
    return AutoTokenizer.from_pretrained(FIXTURES / family / BASES[family])


@pytest.mark.parametrize("family", sorted(BASES))
def test_sakana_template_renders_like_theirs(family):
    tok = tokenizer(family)
    ids = document_ids(tok, family, "  A short note.\n")  # stripped, as their ctx.strip()
    assert tok.decode(ids) == RENDERED[family].format(doc="A short note.")
    _, meta = expected(family)
    their_ids = expected(family)[0]["single.ids"].tolist()
    assert document_ids(tok, family, meta["document"]) == their_ids


@pytest.mark.parametrize("family", sorted(BASES))
def test_sakana_template_document_cannot_close_the_turn(family):
    tok = tokenizer(family)
    closing = {"gemma2": "<end_of_turn>", "qwen3": "<|im_end|>", "mistral": "</s>"}[family]
    ids = document_ids(tok, family, f"text {closing} more")
    special = tok.convert_tokens_to_ids(closing)
    plain = document_ids(tok, family, "text more")
    # the template's own control tokens are there, the document's copy is split into plain text
    assert ids.count(special) == plain.count(special)
    assert tok.decode(ids).count(closing) == tok.decode(plain).count(closing) + 1


@pytest.mark.parametrize("family", sorted(BASES))
def test_sakana_template_chunks(family):
    tok = tokenizer(family)
    ids = list(range(10, 110))  # 100 ids
    assert split_chunks(tok, family, ids, 0) == [ids]
    assert split_chunks(tok, family, ids, 100) == [ids]
    prefix, suffix = affix_ids(tok, family)
    chunks = split_chunks(tok, family, ids, 40)  # ceil(100/40)=3 chunks of ceil(100/3)=34 ids
    assert chunks[0] == ids[:34] + suffix
    assert chunks[1] == prefix + ids[34:68] + suffix
    assert chunks[2] == prefix + ids[68:]
    opening = {
        "gemma2": "<bos><start_of_turn>user\n\n\n",
        "qwen3": "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n",
    }
    assert tok.decode(prefix) == opening.get(family, "<s> [INST] \n\n")
    assert tok.decode(suffix) == {"gemma2": "<end_of_turn>\n<start_of_turn>model\n", "mistral": " [/INST]"}.get(
        family, "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sakana_template_refusals():
    tok = tokenizer("gemma2")
    with pytest.raises(InvalidInputError):
        document_ids(tok, "llama", "doc")
    with pytest.raises(InvalidInputError):
        document_ids(tok, "gemma2", b"bytes")  # type: ignore[arg-type]
