"""Prompt encoding that user text cannot break out of.

The chat template is rendered with placeholders, then the template's own text is tokenized with
special tokens recognised and every message's content with special tokens *split* into plain
text. A document or user message that contains ``<|im_start|>system`` therefore stays data: it
cannot open a new turn or inject a role.
"""

from __future__ import annotations

import re
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from .errors import InvalidInputError

Message = Mapping[str, str]
Prompt = str | Sequence[Message]

_ROLES = {"system", "user", "assistant", "tool"}


def check_text(value: object, what: str = "text") -> str:
    """A ``str`` the tokenizer (and SQLite) can take: not bytes, no lone surrogates.

    Bytes must be decoded by the caller, who knows their encoding; a lone surrogate (what
    ``errors="surrogateescape"`` makes of invalid UTF-8) would otherwise crash the tokenizer.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{what} must be str, got {type(value).__name__}: decode it first (e.g. as UTF-8)")
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be str, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{what} is not valid Unicode (lone surrogate at {exc.start})") from None
    return value


def to_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """Normalise a plain string or a list of ``{"role", "content"}`` dicts."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": check_text(prompt, "prompt")}]
    else:
        if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
            raise InvalidInputError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
        messages = []
        for m in prompt:
            if not isinstance(m, Mapping):
                raise InvalidInputError(f"bad message {m!r}: need a {{'role', 'content'}} mapping")
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES or not isinstance(content, str):
                raise InvalidInputError(f"bad message {dict(m)!r}: need role in {sorted(_ROLES)} and str content")
            messages.append({"role": role, "content": check_text(content, "message content")})
        if not messages:
            raise InvalidInputError("empty message list")
    if system is not None:
        check_text(system, "system")
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
    if context is not None:
        check_text(context, "context")
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
            ids += _encode(tokenizer, by_placeholder[part], split=True)
        else:
            ids += _encode(tokenizer, part, split=False)
    return ids


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain text (documents, completions) with special tokens split: never control tokens."""
    check_text(text)
    return _encode(tokenizer, text, split=True)


# A fast tokenizer has one Rust backend, and ``tokenizer(..., split_special_tokens=x)`` sets a flag
# on it and then encodes: two threads encoding at once can each run in the other's mode, so a
# template's control tokens get split (a broken prompt) or user text has its "<|im_start|>" read
# as a control token (role injection). We encode with two private copies of the backend whose
# flags never change; a slow (pure Python) tokenizer is serialised with a lock instead.
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()
_SLOW_LOCK = threading.Lock()


def _backends(tokenizer: PreTrainedTokenizerBase):
    with _BACKENDS_LOCK:
        pair = _BACKENDS.get(tokenizer)
        if pair is None:
            backend = getattr(tokenizer, "_tokenizer", None)
            pair = (None, None)
            if backend is not None and hasattr(backend, "to_str"):
                from tokenizers import Tokenizer

                copies = []
                for split in (False, True):
                    copy = Tokenizer.from_str(backend.to_str())
                    copy.encode_special_tokens = split
                    copy.no_truncation()
                    copy.no_padding()
                    copies.append(copy)
                pair = tuple(copies)
            _BACKENDS[tokenizer] = pair
    return pair


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, *, split: bool) -> list[int]:
    """``tokenizer(text, add_special_tokens=False, split_special_tokens=split).input_ids``, thread-safe."""
    backend = _backends(tokenizer)[int(split)]
    if backend is None:
        with _SLOW_LOCK:
            return tokenizer(text, add_special_tokens=False, split_special_tokens=split).input_ids
    return backend.encode(text, add_special_tokens=False).ids


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


def last_user_text(messages: Sequence[dict[str, str]]) -> str | None:
    """The latest non-empty user turn: what skill routing and adapter selection look at."""
    for message in reversed(messages):
        if message["role"] == "user" and message["content"].strip():
            return message["content"]
    return None
