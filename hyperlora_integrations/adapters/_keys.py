"""The store's signing key: ``store_signer`` over ``<store>/secret``.

References (``references.py``) are HMAC-signed with a key that lives only in the store, so every
process opening the store signs and verifies alike, and a reference nobody was given activates
nothing. The key is made on first use; ``AdapterStore.secret_path`` names the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import AdapterStore


def store_signer(store: AdapterStore, *, ttl: float | None = 3600.0):
    """The reference signer keyed by ``store``'s secret (created on first use)."""
    from .references import ReferenceSigner, load_or_create_secret

    path = store.secret_path()
    if path.exists():
        return ReferenceSigner(load_or_create_secret(path), ttl=ttl)
    with store.write_lock():  # serialised with recovery, which removes temp files of killed creators
        return ReferenceSigner(load_or_create_secret(path), ttl=ttl)
