"""Opaque, signed references to stored adapters: what a retriever puts where document text was.

A reference reads ``[hyperlora-ref ns=<namespace> id=<adapter id> t=<issued-at> sig=<hmac>]``.
The signature is an HMAC-SHA256 (truncated to 128 bits) over namespace, id and time, keyed by a
secret that lives only in the store (``<store>/secret``, mode 0600) or in the process. So:

* a reference typed or guessed by a user has no valid signature and activates nothing;
* a valid reference copied from one namespace cannot be used where that namespace is not allowed
  (the chat model/LLM is configured with the namespaces it may activate);
* a reference copied from an old answer expires after ``ttl`` seconds (default one hour).

Every reference-shaped string is stripped from the prompt, valid or not, so none reaches the
model as text.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# ``t`` is ASCII digits without a leading zero, and the signature covers the digits as written: a
# reference has exactly one spelling (``\d`` also matched Arabic-Indic and other Unicode digits,
# and ``int()`` read "0123" and "١٢٣" as 123, so altered strings verified under the same signature).
REF_RE = re.compile(
    r"\[hyperlora-ref ns=([A-Za-z0-9_.-]{1,128}) id=([A-Za-z0-9_.-]{1,128}) t=(0|[1-9][0-9]{0,11}) sig=([0-9a-f]{32})\]"
)
# Anything that looks like a reference, well-formed or not: stripped from prompts.
LOOSE_RE = re.compile(r"\[hyperlora-ref[^\]\n]{0,400}\]")


def strip_references(text: str) -> tuple[str, int]:
    """``text`` with every reference-shaped string removed, and how many there were.

    One ``LOOSE_RE.sub("", ...)`` is not enough: removing ``[hyperlora-ref]`` from
    ``[hyper[hyperlora-ref]lora-ref ...]`` joins the two halves into a new, complete reference.
    When that happens the matches are replaced by a newline instead, which no reference can
    contain, so nothing removed can make a new match (and text without nesting is unchanged).
    """
    count = len(LOOSE_RE.findall(text))
    if not count:
        return text, 0
    clean = LOOSE_RE.sub("", text)
    if LOOSE_RE.search(clean):
        clean = LOOSE_RE.sub("\n", text)
    return clean, count


def load_or_create_secret(path: Path) -> bytes:
    """A 32-byte key, created once with mode 0600, never overwritten, never seen half-written.

    The key is written to a temp file, fsynced, then hard-linked into place (atomic, and fails
    if the file exists), so a process killed mid-creation leaves no truncated key and two
    processes racing agree on one key. A symlink is refused: the key must be the store's own
    file, not one an attacker points it at.
    """
    from ..errors import CheckpointError, UnsafeFileError

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its key
        finally:
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafeFileError(f"cannot open reference key {path} (a symlink?): {exc}") from None
    with os.fdopen(fd, "rb") as f:
        key = f.read(4096)
    if len(key) < 32:
        raise CheckpointError(f"reference key {path} is truncated ({len(key)} bytes); delete it to make a new one")
    return key


@dataclass(frozen=True)
class Reference:
    namespace: str
    adapter_id: str


class ReferenceSigner:
    def __init__(self, key: bytes, *, ttl: float | None = 3600.0) -> None:
        if len(key) < 16:
            raise ValueError("reference key must be at least 16 bytes")
        self._key = key
        self.ttl = ttl

    def _sig(self, namespace: str, adapter_id: str, issued: int | str) -> str:
        msg = f"{namespace}\x00{adapter_id}\x00{issued}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def issue(self, namespace: str, adapter_id: str) -> str:
        issued = int(time.time())
        return (
            f"[hyperlora-ref ns={namespace} id={adapter_id} t={issued} sig={self._sig(namespace, adapter_id, issued)}]"
        )

    def verify(self, match: re.Match, allowed_namespaces: set[str] | None = None) -> Reference | None:
        """The reference a ``REF_RE`` match names, or None if forged, expired or not allowed here."""
        ns, adapter_id, issued, sig = match.groups()
        if not hmac.compare_digest(sig, self._sig(ns, adapter_id, issued)):  # the digits as written
            return None
        if self.ttl is not None and time.time() - int(issued) > self.ttl:
            return None
        if allowed_namespaces is not None and ns not in allowed_namespaces:
            return None
        return Reference(ns, adapter_id)

    def extract(self, text: str, allowed_namespaces: set[str] | None = None) -> tuple[str, list[Reference], int]:
        """Strip every reference-shaped string; return (clean text, valid references, rejected count)."""
        valid: list[Reference] = []
        for match in REF_RE.finditer(text):
            ref = self.verify(match, allowed_namespaces)
            if ref is not None and ref not in valid:
                valid.append(ref)
        clean, total = strip_references(text)
        return clean, valid, total - len(valid)
