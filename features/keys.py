"""Key privacy: the raw API key never goes further than this module.

Everything keywatch stores, logs or returns is a `key_id`, an HMAC-SHA256 of the raw key
with a server secret. Without the secret a key_id cannot be turned back into a key nor
checked against a guessed key, so a leaked Redis dump or log file leaks no credentials.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_ID_PREFIX = "k_"
KEY_ID_HEX_CHARS = 32


class KeyHasher:
    """Derives stable, non-reversible key ids from raw keys with a server secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the key hashing secret must not be empty")
        self._secret = secret.encode()

    def key_id(self, raw_key: str) -> str:
        digest = hmac.new(self._secret, raw_key.encode(), hashlib.sha256).hexdigest()
        return KEY_ID_PREFIX + digest[:KEY_ID_HEX_CHARS]

    def __repr__(self) -> str:  # never show the secret
        return "KeyHasher(<secret>)"


def looks_like_key_id(value: str) -> bool:
    """True for strings shaped like a key id (so admin calls can take either form)."""
    body = value[len(KEY_ID_PREFIX):]
    return (
        value.startswith(KEY_ID_PREFIX)
        and len(body) == KEY_ID_HEX_CHARS
        and all(c in "0123456789abcdef" for c in body)
    )
