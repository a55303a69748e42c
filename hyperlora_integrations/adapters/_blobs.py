"""Adapter files (``blobs/<namespace>/<id>.<nonce>.safetensors``) and the cache of decoded ones.

A blob is never modified in place: it is written to a temp file, fsynced and renamed to a name
nobody else uses (a fresh nonce), so a reader holding a name from the index reads a whole file or
finds none (and asks the index again). Reads follow no symlink inside the store. Namespaces and
ids become path components, hence ``check_name``'s alphabet. The cache remembers which blob an
adapter came from, so an adapter replaced on disk is never served from memory.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import CheckpointError, InvalidInputError, UnsafeFileError
from ..lora import Adapter

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # always used with fullmatch
# a blob is "<id>.<nonce>.safetensors"; stores from before nonces used "<id>.safetensors"
_BLOB_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}(\.[0-9a-f]{16})?\.safetensors")  # fullmatch


def check_name(value: str, what: str) -> str:
    """Namespaces and ids become path components: allow only a safe alphabet.

    ``fullmatch``, not ``match``: ``$`` also matches before a final newline, which let
    ``"tenant\n"`` and ``"..\n"`` through as names.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidInputError(f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '-', '.'")
    return value


class BlobsMixin:
    """``AdapterStore``'s blob files and its in-memory cache under a byte budget. The state it
    uses is set up by ``AdapterStore.__init__``."""

    path: Path
    cache_bytes: int
    _cache: OrderedDict[tuple[str, str], tuple[str, Adapter]]
    _cached_bytes: int
    _lock: threading.RLock

    # ------------------------------------------------------------------ files
    def _blob_dir(self, namespace: str) -> Path:
        return self.path / "blobs" / check_name(namespace, "namespace")

    def _blob_path(self, namespace: str, blob: str) -> Path:
        if not isinstance(blob, str) or not _BLOB_RE.fullmatch(blob):
            raise UnsafeFileError(f"index names blob {blob!r}, which is not a store file name")
        return self._blob_dir(namespace) / blob

    def _unlink_blob(self, namespace: str, blob: str) -> None:
        """Delete a replaced/removed blob; a name the store cannot have written is left alone."""
        try:
            path = self._blob_path(namespace, blob)
        except UnsafeFileError:
            return
        if not path.parent.is_symlink():
            path.unlink(missing_ok=True)

    def _write_blob(self, namespace: str, adapter: Adapter) -> str:
        """Write ``adapter`` under a fresh name (temp + fsync + rename + dir fsync); return the name."""
        directory = self._blob_dir(namespace)
        if directory.is_symlink():
            raise UnsafeFileError(f"{directory} is a symlink; refusing to write through it")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{check_name(adapter.id, 'adapter id')}.{secrets.token_hex(8)}.safetensors"
        data = adapter.to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return name

    def _read_blob(self, path: Path) -> bytes:
        """Read a blob without following symlinks anywhere inside the store (no TOCTOU window)."""
        blobs = (self.path / "blobs").resolve()
        if path.parent.is_symlink() or not path.parent.resolve().is_relative_to(blobs):
            raise UnsafeFileError(f"{path.parent} points outside the store")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFileError(f"{path} is a symlink; the store never writes one") from None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFileError(f"{path} is not a regular file")
            if st.st_size > 2**31:
                raise CheckpointError(f"{path} is {st.st_size} bytes, over the 2 GiB adapter limit")
            return f.read()

    # ------------------------------------------------------------------ cache
    def _remember(self, key: tuple[str, str], blob: str, adapter: Adapter) -> None:
        with self._lock:
            if key in self._cache:
                self._cached_bytes -= self._cache.pop(key)[1].nbytes
            if adapter.nbytes > self.cache_bytes:
                return
            self._cache[key] = (blob, adapter)
            self._cached_bytes += adapter.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached_bytes -= old[1].nbytes

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cached(self) -> list[tuple[str, str]]:
        """(namespace, id) of the adapters held in memory, least recently used first."""
        with self._lock:
            return list(self._cache)
