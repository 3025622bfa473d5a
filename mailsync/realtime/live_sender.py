"""Sending SignalR messages *now*, from inside a function: the service's data-plane REST API.

Why not only the ``signalR`` output binding: the host writes a function's
outputs after the function returned, so a message set there leaves after
everything the function still does. A user action's optimistic row is ready
once it is stored, while the function still re-reads the folders' epochs and
queues the job (mailsync.actions.service ``_commit``): sent here at that
moment, the user's other pages have it two round trips and the host's output
writes earlier (issue 17: "reaches the page in < 100 ms").

``POST <endpoint>/api/hubs/{hub}/users/{user}/:send?api-version=2024-12-01``
with ``{"target", "arguments"}``, answered 202 (Azure SignalR data-plane
REST API; the devhost's emulation serves the same path). Authorised, as the
service's server SDKs do, by one of:

* **AccessKey** (the devhost, a keyed connection string): an HS256 JWT
  signed with the key, ``aud`` the request's URL without its query, five
  minutes long;
* **identity** (Azure, access keys disabled): an Entra ID token for
  ``https://signalr.azure.com/.default`` from the Function App's managed
  identity; the role the Bicep grants ("SignalR Service Owner") allows
  sending.

The requests go over :mod:`mailsync.keepalive_http` (kept-alive connections
shared by the threads), not ``requests``: the webhook sends one per
notification POST (``mailsync.monitoring.notified_states``), and a
``requests`` call cost ~2 ms of CPU, more than the rest of the webhook's
work on a notified state (docs/scaling.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from mailsync.errors import ConfigurationError, DependencyUnavailable
from mailsync.keepalive_http import BodyTooLarge, ConnectionFailed, Connections, Origin
from mailsync.realtime.connection_info import check_user_id, service_of, sign_hs256
from mailsync.realtime.service_tokens import API_VERSION, SCOPE
from mailsync.settings import Settings

TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
TOKEN_LIFETIME_S = 300
MAX_ANSWER_BYTES = 64 * 1024   # the service answers 202 with no body, an error with a short one


class RestLiveSender:
    """``LiveSender`` over the SignalR service's REST API (see the module docstring)."""

    def __init__(self, endpoint: str, hub: str, authorization: Callable[[str], str], *,
                 timeout_s: float = TIMEOUT_S) -> None:
        parts = urlsplit(endpoint.rstrip("/"))
        origin = Origin.of(parts)
        if origin is None:
            raise ConfigurationError(f"the SignalR endpoint {endpoint!r} is not an http(s) URL")
        users = f"/api/hubs/{quote(hub.lower(), safe='')}/users"
        self._base = f"{endpoint.rstrip('/')}{users}"          # the token's audience: the URL without its query
        self._path = f"{parts.path.rstrip('/')}{users}"
        self._authorization = authorization
        self._connections = Connections(origin, connect_timeout_s=min(CONNECT_TIMEOUT_S, timeout_s),
                                        read_timeout_s=timeout_s)

    def send(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Each ``{"userId", "target", "arguments"}`` to its user's connections, one request each, in order.

        ``DependencyUnavailable`` when the service cannot be reached or answers 429/5xx,
        ``ConfigurationError`` when it refuses our credentials; the messages after a failed one are not sent.
        """
        for message in messages:
            user = f"/{quote(check_user_id(str(message['userId'])), safe='')}/:send"
            body = orjson.dumps({"target": message["target"], "arguments": list(message.get("arguments") or ())})
            try:
                authorization = self._authorization(self._base + user)
            except Exception as exc:     # the identity's token (azure.identity raises its own errors)
                raise DependencyUnavailable(f"no token for the SignalR service: {type(exc).__name__}",
                                            code="signalr_unavailable") from exc
            try:
                response = self._connections.request(
                    "POST", f"{self._path}{user}?api-version={API_VERSION}",
                    {"Authorization": authorization, "Content-Type": "application/json"}, body,
                    max_bytes=MAX_ANSWER_BYTES)
            except (ConnectionFailed, BodyTooLarge) as exc:
                raise DependencyUnavailable(f"SignalR service unreachable: {type(exc).__name__}",
                                            code="signalr_unavailable") from exc
            if response.status in (401, 403):
                raise ConfigurationError(f"the SignalR service refused our credentials ({response.status})")
            if response.status >= 300:
                raise DependencyUnavailable(f"SignalR service answered {response.status}",
                                            code="signalr_unavailable")

    def close(self) -> None:
        """Close the idle connections."""
        self._connections.close()


def key_authorization(access_key: str, *, clock: Callable[[], float] = time.time) -> Callable[[str], str]:
    """``Authorization`` values for an AccessKey: a short JWT whose audience is the URL called."""
    key = access_key.encode("utf-8")

    def authorization(url: str) -> str:
        now = int(clock())
        return f"Bearer {sign_hs256(key, {'aud': url, 'iat': now, 'exp': now + TOKEN_LIFETIME_S})}"

    return authorization


def sender_from_settings(settings: Settings) -> RestLiveSender:
    """The sender the SignalR settings describe (the same service the output binding and negotiate use)."""
    endpoint, access_key, client_id = service_of(settings)
    if access_key:
        return RestLiveSender(endpoint, settings.signalr_hub, key_authorization(access_key))
    from azure.identity import DefaultAzureCredential  # Azure only: imported on this path alone

    credential = DefaultAzureCredential(managed_identity_client_id=client_id)
    return RestLiveSender(endpoint, settings.signalr_hub,
                          lambda _url: f"Bearer {credential.get_token(SCOPE).token}")
