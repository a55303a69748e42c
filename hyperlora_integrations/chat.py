"""Prompt encoding that user text cannot break out of.

The chat template is rendered with placeholders, then the template's own text is tokenized with
special tokens recognised and every message's content with special tokens *split* into plain
text. A document or user message that contains ``<|im_start|>system`` therefore stays data: it
cannot open a new turn or inject a role.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from .errors import InvalidInputError

Message = Mapping[str, str]
Prompt = str | Sequence[Message]

_ROLES = {"system", "user", "assistant", "tool"}


def to_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """Normalise a plain string or a list of ``{"role", "content"}`` dicts."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = []
        for m in prompt:
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES or not isinstance(content, str):
                raise InvalidInputError(f"bad message {dict(m)!r}: need role in {sorted(_ROLES)} and str content")
            messages.append({"role": role, "content": content})
        if not messages:
            raise InvalidInputError("empty message list")
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


CONTEXT_SEPARATOR = "\n\n"


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    context: str | None = None,
) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, content kept inert.

    ``context`` (a document) is placed before the first user message's content, tokenized on
    its own. Keeping it a separate token run means the ids *with* context are exactly the ids
    without it plus an insertion, which is what context distillation aligns on.
    """
    tag = uuid.uuid4().hex
    placeholders = []
    templated = []
    for i, m in enumerate(messages):
        ph = f"\x00{tag}{i}\x00"
        placeholders.append(ph)
        templated.append({"role": m["role"], "content": ph})
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(templated, tokenize=False, add_generation_prompt=add_generation_prompt)
    else:  # base models without a template: plain "role: content" lines
        rendered = "".join(f"{m['role']}: {ph}\n" for m, ph in zip(templated, placeholders))
        if add_generation_prompt:
            rendered += "assistant: "
    parts = re.split("(" + "|".join(re.escape(p) for p in placeholders) + ")", rendered)
    by_placeholder = {ph: m["content"] for ph, m in zip(placeholders, messages)}
    first_user = next((ph for ph, m in zip(placeholders, messages) if m["role"] == "user"), None)
    ids: list[int] = []
    for part in parts:
        if not part:
            continue
        if part in by_placeholder:
            if context is not None and part == first_user:
                ids += encode_text(tokenizer, context + CONTEXT_SEPARATOR)
            ids += tokenizer(by_placeholder[part], add_special_tokens=False, split_special_tokens=True).input_ids
        else:
            ids += tokenizer(part, add_special_tokens=False).input_ids
    return ids


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain text (documents, completions) with special tokens split: never control tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def context_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Template ids that precede the first user content: documents are encoded after them.

    Doc-to-LoRA reads a document's activations as they are when the document sits in a user
    turn, the same place the teacher sees it in training.
    """
    probe = "\x00probe\x00"
    ids = encode_chat(tokenizer, [{"role": "user", "content": probe}], add_generation_prompt=False)
    probe_ids = encode_text(tokenizer, probe)
    for start in range(len(ids) - len(probe_ids) + 1):
        if ids[start : start + len(probe_ids)] == probe_ids:
            return ids[:start]
    raise ValueError("cannot locate user content in the chat template")
