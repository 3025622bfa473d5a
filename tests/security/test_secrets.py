"""Bearer secrets: random, stored as SHA-256, compared in constant time."""

from __future__ import annotations

import hashlib

import pytest

from mailsync.security.secrets import hash_secret, new_secret, secret_matches


def test_secrets_are_random_and_url_safe() -> None:
    made = {new_secret() for _ in range(200)}
    assert len(made) == 200
    for secret in made:
        assert len(secret) >= 43
        assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_too_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        new_secret(8)


def test_hash_is_sha256_hex_and_never_the_secret() -> None:
    secret = new_secret()
    digest = hash_secret(secret)
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in digest


def test_matches() -> None:
    secret = new_secret()
    digest = hash_secret(secret)
    assert secret_matches(secret, digest)
    assert secret_matches(secret, digest.upper())
    assert not secret_matches(secret + "x", digest)
    assert not secret_matches(new_secret(), digest)
    assert not secret_matches("", digest)
    assert not secret_matches(secret, "")
