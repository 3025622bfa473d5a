"""Random bearer secrets: made here, stored only as SHA-256, compared in constant time.

A bearer secret has 256 bits of randomness, so a plain (unsalted, fast)
SHA-256 is the right hash: there is nothing to brute-force, and a fast hash
keeps every authenticated request cheap. What matters is that the table
never holds the secret itself and that comparisons do not leak timing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_BYTES = 32


def new_secret(nbytes: int = SECRET_BYTES) -> str:
    """A fresh URL-safe random secret (``nbytes`` of randomness, base64url, no padding)."""
    if nbytes < 16:
        raise ValueError("a bearer secret needs at least 128 bits")
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    """The SHA-256 of ``secret`` as lowercase hex: what gets stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, expected_hash: str) -> bool:
    """True when ``secret`` hashes to ``expected_hash``, compared in constant time."""
    if not secret or not expected_hash:
        return False
    return hmac.compare_digest(hash_secret(secret), expected_hash.lower())
