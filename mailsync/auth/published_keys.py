"""The Microsoft identity platform's published signing keys (a JWKS), fetched lazily and cached.

Used to check the JWTs Microsoft signs for us to verify, such as the
validation tokens of change notifications with resource data
(``mailsync.monitoring.validation_tokens``). The keys live at
``https://login.microsoftonline.com/common/discovery/v2.0/keys`` and rotate
often (Microsoft: "signing keys are rotated daily"): cached for an hour,
fetched again for a key id we do not know, at most once a minute. In
sandbox mode the Microsoft hosts are routed to the sandbox's identity
platform (``mailsync.auth.sandbox_routing``), which publishes its own.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from mailsync.auth.sandbox_routing import route_to_sandbox
from mailsync.settings import Settings

log = logging.getLogger("mailsync.auth.published_keys")

KEYS_URL = "https://login.microsoftonline.com/common/discovery/v2.0/keys"
KEYS_TTL_S = 3600.0            # Microsoft rotates its signing keys about daily
REFETCH_MIN_S = 60.0           # an unknown key id fetches the keys again, at most this often
FETCH_TIMEOUT_S = 5.0

# Fetches a JWKS document (the keys); raises on any failure.
KeysFetcher = Callable[[], Mapping[str, Any]]


class SigningKeys:
    """The identity platform's published RS256 keys, by key id, fetched lazily and cached."""

    def __init__(self, fetch: KeysFetcher, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetched_at: float | None = None

    def get(self, kid: str) -> rsa.RSAPublicKey | None:
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at > KEYS_TTL_S
            unknown = kid not in self._keys and (self._fetched_at is None or now - self._fetched_at > REFETCH_MIN_S)
            if stale or unknown:
                self._refresh(now)
            return self._keys.get(kid)

    def _refresh(self, now: float) -> None:
        try:
            document = self._fetch()
        except (requests.RequestException, ValueError) as exc:
            log.warning("cannot fetch the identity platform's signing keys: %s", type(exc).__name__)
            self._fetched_at = now     # not again for a minute (the keys we had stay)
            return
        keys: dict[str, rsa.RSAPublicKey] = {}
        for jwk in document.get("keys") or ():
            if isinstance(jwk, Mapping) and jwk.get("kty") == "RSA" and isinstance(jwk.get("kid"), str):
                try:
                    keys[jwk["kid"]] = rsa.RSAPublicNumbers(_int(jwk.get("e")), _int(jwk.get("n"))).public_key()
                except ValueError:
                    continue
        self._keys = keys
        self._fetched_at = now


def http_keys_fetcher(settings: Settings, session: requests.Session | None = None) -> KeysFetcher:
    """Fetches Microsoft's published keys (the sandbox's in sandbox mode)."""
    url = route_to_sandbox(KEYS_URL, settings.graph_sandbox_url) if settings.graph_sandbox_url else KEYS_URL
    http = session or requests.Session()
    if session is None and not settings.http_clients_read_env:
        http.trust_env = False
        http.verify = settings.http_verify

    def fetch() -> Mapping[str, Any]:
        response = http.get(url, timeout=FETCH_TIMEOUT_S)
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError("the keys document is not a JSON object")
        return document

    return fetch


def b64url_decode(text: str) -> bytes:
    """base64url without padding (JWTs, JWKs); ValueError when it is not."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def _int(value: Any) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url number")
    return int.from_bytes(b64url_decode(value), "big")
