"""How Sakana's Doc-to-LoRA wraps a document in the chat template, per model family.

Their ``tokenize_ctx_text`` renders ``[{"role": "system", "content": ""}, {"role": "user",
"content": doc.strip()}]`` with ``add_generation_prompt=True`` through *their own* templates
(``chat_templates/<model>.jinja``, with every newline and 4-space indent stripped before use), then
tokenizes the whole string with special tokens recognised and none added. The empty system message
matters: Gemma and Mistral put ``system + "\\n\\n"`` in front of the user text, Qwen emits an empty
system turn. What that renders to, per family:

* gemma2:  ``<bos><start_of_turn>user\\n\\n\\n{doc}<end_of_turn>\\n<start_of_turn>model\\n``
* qwen3:   ``<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n{doc}<|im_end|>\\n<|im_start|>assistant\\n``
* mistral: ``<s> [INST] \\n\\n{doc} [/INST] ``

A document longer than ``chunk_len`` tokens is split like their ``split_too_long_ctx``: the
wrapped ids are cut into ``ceil(n / chunk_len)`` equal slices, the first gets the template's
closing ids, the last its opening ids, middle ones both (their ``CTX_AFFIXES``).

One deliberate difference: a document containing a special token's text (``<end_of_turn>``) is
tokenized with that text split into plain tokens, so it cannot close the turn; theirs would read
it as the control token. Documents without such text get exactly their ids.
"""

from __future__ import annotations

import math
from typing import Literal

from ..chat import _encode, check_text
from ..errors import InvalidInputError

Family = Literal["gemma2", "qwen3", "mistral"]

# model_type of the base model -> template family (Doc-to-LoRA was released for these three)
FAMILY_OF_MODEL_TYPE: dict[str, Family] = {"gemma2": "gemma2", "qwen3": "qwen3", "mistral": "mistral"}

_WRAP: dict[str, tuple[str, str]] = {  # (before the document, after it); {bos} = the tokenizer's BOS text
    "gemma2": ("{bos}<start_of_turn>user\n\n\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "qwen3": ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("{bos} [INST] \n\n", " [/INST] "),
}
# chunk affixes: the text their hard-coded CTX_AFFIXES ids spell (note Mistral's has no trailing space)
_AFFIX: dict[str, tuple[str, str]] = {
    "gemma2": ("{bos}<start_of_turn>user\n\n\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "qwen3": ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("{bos} [INST] \n\n", " [/INST]"),
}
# their CTX_AFFIXES for the released tokenizers; used when the tokenizer decodes them to the text above
KNOWN_AFFIX_IDS: dict[str, tuple[list[int], list[int]]] = {
    "gemma2": ([2, 106, 1645, 110], [107, 108, 106, 2516, 108]),
    "qwen3": ([151644, 8948, 198, 151645, 198, 151644, 872, 198], [151645, 198, 151644, 77091, 198]),
    "mistral": ([1, 733, 16289, 28793, 28705, 13, 13], [733, 28748, 16289, 28793]),
}


def _bos(tokenizer) -> str:
    return tokenizer.bos_token or ""


def wrap_text(tokenizer, family: str, text: str) -> tuple[str, str, str]:
    """(opening, document, closing) strings of the rendered template for ``text``."""
    if family not in _WRAP:
        raise InvalidInputError(f"no Doc-to-LoRA template for family {family!r}; known: {sorted(_WRAP)}")
    before, after = _WRAP[family]
    return before.format(bos=_bos(tokenizer)), check_text(text, "document").strip(), after


def _special_texts(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok.content))
    return [s for s in specials if s]


def document_ids(tokenizer, family: str, text: str) -> list[int]:
    """Their ``tokenize_ctx_text`` ids for one document (see the module docstring)."""
    before, doc, after = wrap_text(tokenizer, family, text)
    if any(s in doc for s in _special_texts(tokenizer)):
        return (
            _encode(tokenizer, before, split=False)
            + _encode(tokenizer, doc, split=True)
            + _encode(tokenizer, after, split=False)
        )
    return _encode(tokenizer, before + doc + after, split=False)


def affix_ids(tokenizer, family: str) -> tuple[list[int], list[int]]:
    """Opening and closing ids put around middle chunks (their ``CTX_AFFIXES``)."""
    before, after = (s.format(bos=_bos(tokenizer)) for s in _AFFIX[family])
    known = KNOWN_AFFIX_IDS.get(family)
    if known is not None:
        try:
            if tokenizer.decode(known[0]) == before and tokenizer.decode(known[1]) == after:
                return list(known[0]), list(known[1])
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):
            pass
    return _encode(tokenizer, before, split=False), _encode(tokenizer, after, split=False)


def split_chunks(tokenizer, family: str, ids: list[int], chunk_len: int) -> list[list[int]]:
    """Their ``split_too_long_ctx`` at evaluation (``is_train=False``); ``chunk_len <= 0``: no split."""
    if chunk_len <= 0:
        return [list(ids)]
    n = max(1, math.ceil(len(ids) / chunk_len))
    if n == 1:
        return [list(ids)]
    step = math.ceil(len(ids) / n)
    chunks = [list(ids[i : i + step]) for i in range(0, len(ids), step)]
    prefix, suffix = affix_ids(tokenizer, family)
    chunks[0] = chunks[0] + suffix
    for i in range(1, len(chunks) - 1):
        chunks[i] = prefix + chunks[i] + suffix
    chunks[-1] = prefix + chunks[-1]
    return chunks
