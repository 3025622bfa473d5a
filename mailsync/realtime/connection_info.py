"""Connection info for the page's live channel, minted for a verified account id.

Why not the ``signalRConnectionInfo`` input binding
---------------------------------------------------
The binding's ``userId`` is a binding expression (``{headers.x}``,
``{query.x}``, a route value or a body property), resolved by the host
from the request *before* the function runs: in Azure's host and in the
devhost alike (``devhost/bindings.py``). Every value it can see is chosen
by the client. Our account id is only known once the bearer token has
been verified, inside the function, and a Python function cannot bind
imperatively. A binding-based negotiate could only check the client's
claimed id after the token had been minted for it; we would rather the
user id never come from the client at all. So the negotiate function asks
this port for the same ``{url, accessToken}`` the binding would return,
for the account its bearer token opened.

Two ways to mint, as the Functions SignalR extension itself does:

* **AccessKey** (``AzureSignalRConnectionString=Endpoint=...;AccessKey=...``,
  the devhost locally): sign the client token ourselves, HS256 with the key;
  ``aud`` is the client URL, ``nameid`` the user id, one hour.
* **Identity-based** (Azure, where access keys are disabled:
  ``AzureSignalRConnectionString__serviceUri`` and ``__clientId``): the
  service issues the token (``POST /api/hubs/{hub}/:generateToken``) to
  the Function App's managed identity (``service_tokens.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import orjson

from mailsync.errors import ConfigurationError, InputError
from mailsync.models import LiveConnectionInfo
from mailsync.ports import LiveConnections
from mailsync.settings import Settings

TOKEN_LIFETIME_S = 3600          # what the binding issues; the client negotiates again on reconnect
MAX_USER_ID_CHARS = 128


def parse_connection_string(value: str) -> dict[str, str]:
    """``Endpoint=...;AccessKey=...;Version=1.0;`` as a dict with lower-case keys."""
    parts = (p.partition("=") for p in value.split(";") if p.strip())
    return {k.strip().lower(): v.strip() for k, sep, v in parts if sep}


def client_url(endpoint: str, hub: str) -> str:
    """The URL clients connect to (and the ``aud`` of their token): ``<endpoint>/client/?hub=<hub>``."""
    return f"{endpoint.rstrip('/')}/client/?hub={quote(hub.lower(), safe='')}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_hs256(key: bytes, claims: Mapping[str, Any]) -> str:
    """A compact HS256 JWT (the token format Azure SignalR accepts from AccessKey holders)."""
    header = _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64url(orjson.dumps(dict(claims)))
    signature = hmac.new(key, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def check_user_id(user_id: str) -> str:
    if not user_id or len(user_id) > MAX_USER_ID_CHARS or not user_id.isprintable():
        raise InputError("invalid SignalR user id")
    return user_id


class KeySignedConnections:
    """``LiveConnections`` for an AccessKey connection string: tokens signed here."""

    def __init__(self, endpoint: str, access_key: str, hub: str, *,
                 lifetime_s: int = TOKEN_LIFETIME_S, clock: Callable[[], float] = time.time) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigurationError("AzureSignalRConnectionString: Endpoint must be an http(s) URL")
        if not access_key:
            raise ConfigurationError("AzureSignalRConnectionString: AccessKey is empty")
        self._url = client_url(endpoint, hub)
        self._key = access_key.encode("utf-8")
        self._lifetime_s = lifetime_s
        self._clock = clock

    def connection_info(self, user_id: str) -> LiveConnectionInfo:
        now = int(self._clock())
        claims = {"aud": self._url, "iat": now, "nbf": now, "exp": now + self._lifetime_s,
                  "nameid": check_user_id(user_id)}
        return LiveConnectionInfo(url=self._url, access_token=sign_hs256(self._key, claims))


def service_of(settings: Settings) -> tuple[str, str | None, str | None]:
    """The SignalR service the settings name: its endpoint, the AccessKey (None: identity-based) and the
    managed identity's client id."""
    parsed = parse_connection_string(settings.signalr_connection_string or "")
    endpoint = parsed.get("endpoint") or settings.signalr_service_uri
    if not endpoint:
        raise ConfigurationError("no SignalR service configured: set AzureSignalRConnectionString (Endpoint=...;"
                                 "AccessKey=...) or AzureSignalRConnectionString__serviceUri (managed identity)")
    if parsed.get("port"):
        endpoint = f"{endpoint.rstrip('/')}:{parsed['port']}"
    return endpoint, parsed.get("accesskey") or None, parsed.get("clientid") or settings.signalr_client_id


def connections_from_settings(settings: Settings) -> LiveConnections:
    """The minting adapter the settings describe (see the module docstring)."""
    hub = settings.signalr_hub
    endpoint, access_key, client_id = service_of(settings)
    if access_key:
        return KeySignedConnections(endpoint, access_key, hub)
    # Identity-based: imported on this path only (it needs the Azure identity libraries).
    from mailsync.realtime.service_tokens import ServiceIssuedConnections

    return ServiceIssuedConnections.with_managed_identity(endpoint, hub, client_id=client_id)
