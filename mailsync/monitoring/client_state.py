"""Signed clientStates: the webhook authenticates a notification without reading a table.

Graph echoes the ``clientState`` we gave a subscription in every one of its
notifications; it is how the webhook (an anonymous URL) tells Graph's POSTs
from forgeries. It used to be a random secret whose SHA-256 sat in the
subscription's row, so every POST cost a table read of that row (and one of
the account row) before anything else: two of the ~3.6 table transactions a
change cost in the webhook (docs/scaling.md).

A signed clientState carries what the webhook needs and proves it::

    v1.<kind>.<account id>.<nonce>.<key id>.<mac>

* ``kind``: ``m`` (``me/messages``) or ``f`` (``me/mailFolders``), what the
  webhook used to read from the subscription row;
* ``nonce``: random, so each subscription's clientState differs;
* ``mac``: HMAC-SHA256 over the fields before it, truncated to 128 bits,
  under a key derived from the deployment's secret keys
  (``TOKEN_ENCRYPTION_KEYS``, or the sandbox's development key): the first
  key signs, every listed key verifies. A renewal keeps a subscription's
  clientState, so one signed under a key no longer listed is checked the
  old way, against the SHA-256 its subscription row keeps (stored for every
  clientState): dropping a key costs those subscriptions the two reads, never
  their notifications.

What changes against the stored hash: a subscription we deleted (replaced,
or its account unlinked) is no longer refused by the webhook. Its
notifications then cost what any notification costs (one NOTIFIED job, which
reads the account and drops the job when it is gone, after taking the
pending row, so nothing is left behind): a notification carries no data, and
the worst a replay can cause is one extra, idempotent sync. A forged item
(wrong MAC, unknown key id) is dropped without any storage call. A
clientState that is not of this shape (subscriptions created before it) goes
the old way, through the subscription row.

At most 128 characters (Graph's limit): 2 + 2 + 33 (a 32-hex account id) +
23 + key id + 23.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from mailsync.errors import ConfigurationError
from mailsync.monitoring.records import SubscriptionKind

VERSION = "v1"
MAX_LENGTH = 128
NONCE_BYTES = 16
MAC_BYTES = 16
_KIND_CODES = {SubscriptionKind.MESSAGES: "m", SubscriptionKind.FOLDERS: "f"}
_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
# The signing key is derived, never the encryption key itself: a MAC must not reuse AES-GCM's key.
_DERIVATION_LABEL = b"mailsync/graph-clientState/v1"


@dataclass(frozen=True)
class SignedState:
    """What a valid signed clientState says."""

    account_id: str
    kind: SubscriptionKind


class ClientStates:
    """Makes and checks signed clientStates under a rotating key set (the first key signs)."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigurationError("signing clientStates needs at least one key")
        self._keys = {kid: hmac.new(key, _DERIVATION_LABEL, hashlib.sha256).digest() for kid, key in keys}
        self._primary = keys[0][0]

    def new(self, account_id: str, kind: SubscriptionKind) -> str:
        """A fresh clientState for a subscription of ``kind`` on ``account_id``."""
        if "." in account_id or not account_id.isascii():
            raise ValueError("an account id in a clientState must be ASCII without dots")
        nonce = _b64(secrets.token_bytes(NONCE_BYTES))
        signed = f"{VERSION}.{_KIND_CODES[kind]}.{account_id}.{nonce}.{self._primary}"
        state = f"{signed}.{self._mac(self._primary, signed)}"
        if len(state) > MAX_LENGTH:
            raise ValueError("the clientState would exceed Graph's 128 characters")
        return state

    @staticmethod
    def is_signed(client_state: str) -> bool:
        """Whether ``client_state`` has the signed shape (else: a random one of an older subscription)."""
        return client_state.startswith(VERSION + ".")

    def can_verify(self, client_state: str) -> bool:
        """Whether ``client_state`` is signed under a key listed now (else the webhook checks its stored hash).

        A key dropped from the list leaves the subscriptions signed under it (a renewal keeps its
        clientState) to the subscription row's hash, as older random clientStates: their
        notifications keep arriving, at the old cost, until the subscriptions are recreated.
        """
        parts = client_state.split(".")
        return len(parts) == 6 and parts[0] == VERSION and parts[4] in self._keys

    def verify(self, client_state: str) -> SignedState | None:
        """The account and kind a signed clientState vouches for; None when it is not genuine."""
        if not client_state.isascii():
            return None
        parts = client_state.split(".")
        if len(parts) != 6 or parts[0] != VERSION:
            return None
        _, code, account_id, _nonce, kid, mac = parts
        kind = _KINDS.get(code)
        if kind is None or kid not in self._keys or not account_id:
            return None
        expected = self._mac(kid, client_state[: -len(mac) - 1])
        if not hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii", errors="replace")):
            return None
        return SignedState(account_id, kind)

    def _mac(self, kid: str, signed: str) -> str:
        return _b64(hmac.new(self._keys[kid], signed.encode("ascii"), hashlib.sha256).digest()[:MAC_BYTES])


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
