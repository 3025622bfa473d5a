"""Route Microsoft's sign-in and Graph hosts to the local Graph sandbox.

MSAL for Python refuses ``http://`` authorities and, for the well-known
authority, calls instance discovery on ``login.microsoftonline.com``. So in
sandbox mode the product keeps the real authority
(``https://login.microsoftonline.com/<tenant>``) and hands MSAL an
``http_client`` that sends every request for a Microsoft host to the sandbox
instead. MSAL's code path stays exactly the one used against Entra ID.

The browser never sees this session: the authorize URL MSAL builds is
rewritten with :func:`browser_authorize_url` before it is shown, so the
sign-in page opens from the (plain HTTP, local) sandbox without certificate
warnings.

The sandbox registers a demo application (below) so a fresh checkout can link
an account with no Microsoft app registration at all.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from mailsync.errors import ConfigurationError

# The Graph sandbox's built-in demo app registration (confidential web app).
# Not a secret: it only opens the local demo tenant. Redirect URIs allowed:
# http://127.0.0.1:<any port>/api/oauth/callback and
# http://localhost:<any port>/api/oauth/callback (Entra's loopback rule).
SANDBOX_CLIENT_ID = "3f8e2a6c-51d4-4b7e-9c0a-6d2b1e7f4a93"
SANDBOX_CLIENT_SECRET = "demo~sandbox-secret-not-for-production"

# Hosts MSAL or Graph clients may call. The aliases are the ones Entra's
# instance discovery lists for the public cloud.
LOGIN_HOSTS = frozenset({"login.microsoftonline.com", "login.microsoft.com", "login.windows.net",
                         "sts.windows.net"})
GRAPH_HOSTS = frozenset({"graph.microsoft.com"})
ROUTED_HOSTS = LOGIN_HOSTS | GRAPH_HOSTS


def _split_sandbox_url(sandbox_url: str) -> tuple[str, str, str]:
    parts = urlsplit(sandbox_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigurationError(f"GRAPH_SANDBOX_URL must be an http(s) base URL, got {sandbox_url!r}")
    return parts.scheme, parts.netloc, parts.path.rstrip("/")


def route_to_sandbox(url: str, sandbox_url: str) -> str:
    """Return ``url`` pointed at the sandbox when it targets a Microsoft host.

    ``https://login.microsoftonline.com/common/oauth2/v2.0/token`` becomes
    ``<sandbox_url>/common/oauth2/v2.0/token``; path, query and fragment are
    kept. Any other URL (for example an absolute ``@odata.nextLink`` that
    already points at the sandbox) is returned unchanged.
    """
    scheme, netloc, prefix = _split_sandbox_url(sandbox_url)
    parts = urlsplit(url)
    if parts.scheme != "https" or (parts.hostname or "").lower() not in ROUTED_HOSTS:
        return url
    return urlunsplit((scheme, netloc, prefix + (parts.path or "/"), parts.query, parts.fragment))


def browser_authorize_url(url: str, sandbox_url: str) -> str:
    """Rewrite the authorize URL MSAL built so a browser opens the sandbox's sign-in page.

    Raises ValueError for anything that is not a Microsoft sign-in URL: the
    product must never send a browser somewhere this function did not expect.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or (parts.hostname or "").lower() not in LOGIN_HOSTS:
        raise ValueError("not a Microsoft sign-in URL")
    return route_to_sandbox(url, sandbox_url)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SandboxRoutingSession(requests.Session):
    """A ``requests.Session`` that sends Microsoft-host requests to the sandbox.

    Pass it as MSAL's ``http_client`` and as the Graph client's session. It
    rewrites the URL before requests applies proxy settings, and again on
    every redirect hop.
    """

    def __init__(self, sandbox_url: str, *, pool_size: int = 16) -> None:
        super().__init__()
        _split_sandbox_url(sandbox_url)  # fail at construction, not at the first sign-in
        self.sandbox_url = sandbox_url.rstrip("/")
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.mount("https://", adapter)
        self.mount("http://", adapter)
        # Environment proxies and CA bundles (this machine sets
        # REQUESTS_CA_BUNDLE) are meant for the real Microsoft endpoints; a
        # loopback sandbox must be reached directly.
        self.trust_env = not _is_loopback(urlsplit(self.sandbox_url).hostname)

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if isinstance(url, bytes):
            url = url.decode("utf-8")
        return super().request(method, route_to_sandbox(url, self.sandbox_url), *args, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        # Redirects are followed through send(), not request().
        if request.url:
            request.url = route_to_sandbox(request.url, self.sandbox_url)
        return super().send(request, **kwargs)
