"""Secrets at rest: AES-GCM with a key id beside every ciphertext, so keys can rotate.

Key set
    ``Settings.token_encryption_keys`` holds ``(kid, key)`` pairs (production
    fills ``TOKEN_ENCRYPTION_KEYS`` from Key Vault). The **first** key seals
    everything new; **every** key opens. Rotation is therefore: put the new
    key first, keep the old one listed until every row has been rewritten
    (a token cache is rewritten on each refresh, about hourly while an
    account syncs), then drop it. A row sealed under a key that is no longer
    listed is a configuration error, reported as such, never guessed at.

Binding
    Each seal takes a ``context`` string (for example ``"msal:<account_id>"``)
    used as AES-GCM associated data: a ciphertext copied onto another
    account's row does not open there.

No key configured
    Against real Microsoft, mailsync refuses to start linking without a key.
    In sandbox mode (no app registration: the tokens are the sandbox's own)
    a development key is generated once and kept under the local state
    directory (``.local/`` by default), so ``make run`` works with nothing
    configured and restarts can still read what they wrote.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailsync.errors import ConfigurationError
from mailsync.settings import Settings

NONCE_BYTES = 12
DEV_KEY_ID = "devlocal"
DEV_KEY_FILE = "dev-token-key"


@dataclass(frozen=True)
class Sealed:
    """A ciphertext and the id of the key that sealed it.

    ``blob`` is ``nonce || ciphertext || tag`` (AES-GCM appends the tag).
    """

    key_id: str
    blob: bytes


class TokenCipher:
    """Seals and opens small secrets (token caches, passwords) under a rotating key set."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigurationError("at least one encryption key is required")
        self._keys: dict[str, AESGCM] = {}
        for kid, key in keys:
            if not kid or not kid.isascii() or not kid.replace("-", "").replace("_", "").isalnum():
                raise ConfigurationError("encryption key ids must be short ASCII words (letters, digits, - or _)")
            if kid in self._keys:
                raise ConfigurationError(f"encryption key id {kid!r} is listed twice")
            if len(key) not in (16, 24, 32):
                raise ConfigurationError(f"encryption key {kid!r} must be 128, 192 or 256 bits")
            self._keys[kid] = AESGCM(key)
        self._primary = keys[0][0]

    @property
    def primary_key_id(self) -> str:
        """The id of the key that seals new data."""
        return self._primary

    def seal(self, plaintext: bytes, *, context: str) -> Sealed:
        """Encrypt ``plaintext`` under the primary key, bound to ``context``."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        blob = nonce + self._keys[self._primary].encrypt(nonce, plaintext, context.encode("utf-8"))
        return Sealed(self._primary, blob)

    def open(self, sealed: Sealed, *, context: str) -> bytes:
        """Decrypt ``sealed``; ConfigurationError when its key is gone or it was tampered with."""
        aes = self._keys.get(sealed.key_id)
        if aes is None:
            raise ConfigurationError(
                f"a stored secret is sealed with key {sealed.key_id!r}, which is not in TOKEN_ENCRYPTION_KEYS")
        if len(sealed.blob) <= NONCE_BYTES:
            raise ConfigurationError("a stored secret is truncated")
        nonce, ciphertext = sealed.blob[:NONCE_BYTES], sealed.blob[NONCE_BYTES:]
        try:
            return aes.decrypt(nonce, ciphertext, context.encode("utf-8"))
        except InvalidTag as exc:
            # Wrong key material under a known id, a row copied between
            # accounts, or corruption: all mean "do not trust this row".
            raise ConfigurationError(f"a stored secret failed authentication under key {sealed.key_id!r}") from exc

    def needs_reseal(self, sealed: Sealed) -> bool:
        """True when ``sealed`` is under an older key (rewrite it to finish a rotation)."""
        return sealed.key_id != self._primary


def generate_key() -> str:
    """A new 256-bit key as base64, the form TOKEN_ENCRYPTION_KEYS takes."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def load_cipher(settings: Settings) -> TokenCipher:
    """The cipher for this deployment, from the settings (``secret_keys``)."""
    return TokenCipher(secret_keys(settings))


def secret_keys(settings: Settings) -> Sequence[tuple[str, bytes]]:
    """The deployment's secret keys, ``(kid, key)``, the first one current.

    Keys configured → those. None configured → a persisted development key,
    but only in sandbox mode; against real Microsoft that is refused. Other
    uses (signing clientStates) derive their own keys from these.
    """
    if settings.token_encryption_keys:
        return settings.token_encryption_keys
    if not settings.uses_graph_sandbox:
        raise ConfigurationError(
            "TOKEN_ENCRYPTION_KEYS is required when linking real Microsoft accounts "
            "(format kid:base64key; generate one with `python -m mailsync.security.crypto`)")
    return [(DEV_KEY_ID, dev_key(Path(settings.local_dir)))]


def dev_key(directory: Path) -> bytes:
    """The sandbox-only development key under ``directory``, created on first use.

    Creation is atomic (write a private temp file, then hard-link it into
    place), so two processes starting together agree on one key.
    """
    path = directory / DEV_KEY_FILE
    try:
        return _read_dev_key(path)
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{DEV_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(generate_key() + "\n")
        with contextlib.suppress(FileExistsError):  # another process won the race: use its key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_dev_key(path)


def _read_dev_key(path: Path) -> bytes:
    text = path.read_text(encoding="ascii").strip()
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ConfigurationError(f"{path} does not hold a base64 key; delete it to make a new one") from exc
    if len(key) != 32:
        raise ConfigurationError(f"{path} does not hold a 256-bit key; delete it to make a new one")
    return key


if __name__ == "__main__":
    # `python -m mailsync.security.crypto` prints a fresh TOKEN_ENCRYPTION_KEYS entry.
    print(f"k{secrets.token_hex(3)}:{generate_key()}")
