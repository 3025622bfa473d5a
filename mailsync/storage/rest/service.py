"""A signed request to one Storage service, with retries, timeouts and the SDK's exceptions."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from urllib.parse import quote

from mailsync.keepalive_http import ConnectionFailed, Connections, Response
from mailsync.storage.rest.auth import Authorizer, Endpoint
from mailsync.storage.rest.errors import unreachable
from mailsync.storage.rest.retry import RetryPolicy


class ServiceClient:
    """Requests to ``endpoint`` for ``service`` ("table" or "queue"), signed by ``auth``."""

    def __init__(self, service: str, endpoint: Endpoint, auth: Authorizer, *, retry: RetryPolicy,
                 connect_timeout_s: float, read_timeout_s: float, tls: ssl.SSLContext | None = None,
                 on_request: Callable[[str, str], None] | None = None) -> None:
        self.service = service
        self._on_request = on_request   # (method, path) of every request sent, retries included: tests count them
        self.endpoint = endpoint
        self.auth = auth
        self.retry = retry
        self._connections = Connections(endpoint.origin, connect_timeout_s=connect_timeout_s,
                                        read_timeout_s=read_timeout_s, tls=tls)

    def send(self, method: str, path: str, doing: str, *, query: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None, body: bytes = b"") -> Response:
        """``method`` on ``path`` (URL-encoded, after the endpoint's own path), retried; any status is returned.

        A request that never got an answer raises azure-core's
        ``ServiceRequestError`` / ``ServiceResponseError`` (an ``AzureError``).
        """
        full_path = self.endpoint.path + path
        params = dict(query or {})
        target = full_path
        encoded = "&".join(f"{name}={quote(value, safe='')}" for name, value in params.items())
        if self.auth.sas:
            encoded = f"{encoded}&{self.auth.sas}" if encoded else self.auth.sas
        if encoded:
            target += "?" + encoded

        def attempt() -> Response:
            signed = dict(headers or {})
            if body or method in ("POST", "PUT", "PATCH"):
                signed["Content-Length"] = str(len(body))   # signed by the queue service's Shared Key
            self.auth.headers(self.service, method, full_path, params, signed)   # a fresh date per try
            if self._on_request is not None:
                self._on_request(method, full_path)
            return self._connections.request(method, target, signed, body)

        try:
            return self.retry.run(attempt)
        except ConnectionFailed as exc:
            raise unreachable(exc, doing) from exc

    def close(self) -> None:
        self._connections.close()
