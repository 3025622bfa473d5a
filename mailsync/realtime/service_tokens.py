"""Client tokens issued by Azure SignalR Service itself, for identity-based connections.

In Azure the service has local auth (access keys) disabled and the
Function App reaches it with its managed identity, so there is no key to
sign a client token with. The data-plane REST API issues one instead:
``POST <endpoint>/api/hubs/{hub}/:generateToken?userId=…&minutesToExpire=…``
with an Entra ID bearer token for ``https://signalr.azure.com/.default``,
answered ``{"token": "…"}``. The identity needs a role that allows it
(the Bicep grants "SignalR Service Owner", as the Functions extension needs).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import requests

from mailsync.errors import ConfigurationError, DependencyUnavailable
from mailsync.models import LiveConnectionInfo
from mailsync.realtime.connection_info import TOKEN_LIFETIME_S, check_user_id, client_url

API_VERSION = "2024-12-01"
SCOPE = "https://signalr.azure.com/.default"
TIMEOUT_S = 10.0


class ServiceIssuedConnections:
    """``LiveConnections`` that asks the service for each client token."""

    def __init__(self, endpoint: str, hub: str, bearer: Callable[[], str], *,
                 session: requests.Session | None = None, lifetime_s: int = TOKEN_LIFETIME_S) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._hub = hub.lower()
        self._bearer = bearer
        self._session = session or requests.Session()
        self._minutes = max(1, lifetime_s // 60)

    @classmethod
    def with_managed_identity(cls, endpoint: str, hub: str, *, client_id: str | None) -> ServiceIssuedConnections:
        from azure.identity import DefaultAzureCredential  # Azure only: imported on this path alone

        credential = DefaultAzureCredential(managed_identity_client_id=client_id)
        return cls(endpoint, hub, lambda: credential.get_token(SCOPE).token)

    def connection_info(self, user_id: str) -> LiveConnectionInfo:
        url = f"{self._endpoint}/api/hubs/{quote(self._hub, safe='')}/:generateToken"
        params = {"userId": check_user_id(user_id), "minutesToExpire": str(self._minutes), "api-version": API_VERSION}
        try:
            response = self._session.post(url, params=params, headers={"Authorization": f"Bearer {self._bearer()}"},
                                          timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise DependencyUnavailable(f"SignalR service unreachable: {type(exc).__name__}",
                                        code="signalr_unavailable") from exc
        if response.status_code in (401, 403):
            raise ConfigurationError(f"the SignalR service refused our identity ({response.status_code}): "
                                     "check the role assignment")
        if response.status_code == 429 or response.status_code >= 500:
            raise DependencyUnavailable(f"SignalR service answered {response.status_code}", code="signalr_unavailable")
        try:
            token = response.json()["token"] if response.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise DependencyUnavailable(f"SignalR service gave no token ({response.status_code})",
                                        code="signalr_unavailable")
        return LiveConnectionInfo(url=client_url(self._endpoint, self._hub), access_token=token)
