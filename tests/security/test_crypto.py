"""AES-GCM sealing, key rotation and the sandbox-only development key."""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

import pytest

from mailsync.errors import ConfigurationError
from mailsync.security.crypto import DEV_KEY_FILE, DEV_KEY_ID, Sealed, TokenCipher, dev_key, load_cipher
from mailsync.settings import Settings


def key(n: int) -> bytes:
    return bytes([n]) * 32


def test_seal_open_round_trip_and_ciphertext_hides_plaintext() -> None:
    cipher = TokenCipher([("k1", key(1))])
    secret = b'{"RefreshToken": {"secret": "rt-abc"}}'
    sealed = cipher.seal(secret, context="msal:acct1")
    assert sealed.key_id == "k1"
    assert b"rt-abc" not in sealed.blob
    assert cipher.open(sealed, context="msal:acct1") == secret


def test_every_seal_uses_a_fresh_nonce() -> None:
    cipher = TokenCipher([("k1", key(1))])
    assert cipher.seal(b"same", context="c").blob != cipher.seal(b"same", context="c").blob


def test_context_binds_the_ciphertext_to_its_row() -> None:
    cipher = TokenCipher([("k1", key(1))])
    sealed = cipher.seal(b"tokens of account 1", context="msal:acct1")
    with pytest.raises(ConfigurationError, match="failed authentication"):
        cipher.open(sealed, context="msal:acct2")


def test_tampering_is_detected() -> None:
    cipher = TokenCipher([("k1", key(1))])
    sealed = cipher.seal(b"payload", context="c")
    flipped = bytearray(sealed.blob)
    flipped[-1] ^= 1
    with pytest.raises(ConfigurationError):
        cipher.open(Sealed("k1", bytes(flipped)), context="c")
    with pytest.raises(ConfigurationError, match="truncated"):
        cipher.open(Sealed("k1", sealed.blob[:5]), context="c")


def test_rotation_first_key_seals_all_keys_open() -> None:
    old = TokenCipher([("old", key(1))])
    sealed_old = old.seal(b"written before rotation", context="c")
    rotated = TokenCipher([("new", key(2)), ("old", key(1))])
    assert rotated.primary_key_id == "new"
    assert rotated.open(sealed_old, context="c") == b"written before rotation"
    assert rotated.needs_reseal(sealed_old)
    resealed = rotated.seal(b"written before rotation", context="c")
    assert resealed.key_id == "new" and not rotated.needs_reseal(resealed)
    # Once the old key is dropped, old rows are a clear configuration error.
    with pytest.raises(ConfigurationError, match="'old'"):
        TokenCipher([("new", key(2))]).open(sealed_old, context="c")


def test_same_kid_with_different_key_material_fails_closed() -> None:
    sealed = TokenCipher([("k1", key(1))]).seal(b"x", context="c")
    with pytest.raises(ConfigurationError):
        TokenCipher([("k1", key(9))]).open(sealed, context="c")


@pytest.mark.parametrize("keys", [[], [("k1", b"short")], [("k1", key(1)), ("k1", key(2))], [("bad:id", key(1))]])
def test_bad_key_sets_are_refused(keys: list[tuple[str, bytes]]) -> None:
    with pytest.raises(ConfigurationError):
        TokenCipher(keys)


def test_configured_keys_win(tmp_path: Path) -> None:
    b64 = base64.b64encode(key(3)).decode()
    settings = Settings.from_env({"TOKEN_ENCRYPTION_KEYS": f"prod1:{b64}", "MAILSYNC_LOCAL_DIR": str(tmp_path)})
    cipher = load_cipher(settings)
    assert cipher.primary_key_id == "prod1"
    assert not (tmp_path / DEV_KEY_FILE).exists()


def test_real_microsoft_without_a_key_is_refused(tmp_path: Path) -> None:
    settings = Settings.from_env({"MS_CLIENT_ID": "app", "MS_CLIENT_SECRET": "s", "MAILSYNC_LOCAL_DIR": str(tmp_path)})
    assert not settings.uses_graph_sandbox
    with pytest.raises(ConfigurationError, match="TOKEN_ENCRYPTION_KEYS is required"):
        load_cipher(settings)
    assert not (tmp_path / DEV_KEY_FILE).exists()


def test_sandbox_without_a_key_persists_one_private_dev_key(tmp_path: Path) -> None:
    settings = Settings.from_env({"MAILSYNC_LOCAL_DIR": str(tmp_path / "state")})
    assert settings.uses_graph_sandbox
    first = load_cipher(settings)
    assert first.primary_key_id == DEV_KEY_ID
    path = tmp_path / "state" / DEV_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    sealed = first.seal(b"survives a restart", context="c")
    assert load_cipher(settings).open(sealed, context="c") == b"survives a restart"


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(dev_key(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert sorted(os.listdir(tmp_path)) == [DEV_KEY_FILE]  # no temp files left behind


def test_a_corrupt_dev_key_is_reported_not_replaced(tmp_path: Path) -> None:
    (tmp_path / DEV_KEY_FILE).write_text("not base64 !!")
    with pytest.raises(ConfigurationError, match="delete it"):
        dev_key(tmp_path)
