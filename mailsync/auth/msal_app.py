"""The MSAL adapter: the only module that imports ``msal``.

Everything Microsoft-identity-specific is here; MSAL's error dicts and
``ValueError``s are turned into project errors once, at this boundary, so
nothing above ever looks at an OAuth ``error`` field.

One ``ConfidentialClientApplication`` is built per operation, around the
token cache of one account: MSAL binds a cache to an application object,
and a worker process serves many accounts on many threads. Building one is
cheap because the authority's discovery document (the only network call a
construction makes) is cached process-wide by :class:`_DiscoveryCache`.

Sandbox mode keeps MSAL's real authority, ``https://login.microsoftonline.com/
<tenant>``, and gives it a ``SandboxRoutingSession`` that sends Microsoft's
hosts to the local sandbox; only the authorize URL shown to the browser is
rewritten (``browser_authorize_url``).

Scopes: ``Mail.ReadWrite`` and ``User.Read``. MSAL adds ``openid profile
offline_access`` itself (and refuses them if passed), so the consent the
user sees is ``Mail.ReadWrite offline_access User.Read`` plus sign-in.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msal
import requests

from mailsync.auth.sandbox_routing import SandboxRoutingSession, browser_authorize_url
from mailsync.errors import (
    ConfigurationError,
    InputError,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
)
from mailsync.settings import Settings

AUTHORITY_HOST = "https://login.microsoftonline.com"
SCOPES: tuple[str, ...] = ("Mail.ReadWrite", "User.Read")
# What the user consents to, as docs and the page show it (MSAL adds the reserved ones).
CONSENTED_SCOPES = "Mail.ReadWrite offline_access User.Read"
HTTP_TIMEOUT_S = 30.0
DISCOVERY_TTL_S = 24 * 3600.0

# OAuth errors that mean "the grant is gone: the user must sign in again".
# The callback is a GET with the code in the query (the page and the issue's
# contract). MSAL recommends form_post to keep codes out of URLs; here a code
# alone is worthless — it is single use and bound to the PKCE verifier that
# never leaves the server — and our logs never carry query strings.
warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended", category=UserWarning)

_REAUTH_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required", "login_required"})
# OAuth errors that are the identity platform's transient trouble.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})

# Readable texts for the page: never the provider's raw description (it can
# carry trace ids, user names or hints we do not want to echo).
_READABLE = {
    "access_denied": "Sign-in was cancelled or access to the mailbox was not granted.",
    "consent_required": "Access to the mailbox was not granted.",
    "interaction_required": "Microsoft needs you to sign in again.",
    "login_required": "Microsoft needs you to sign in again.",
    "invalid_grant": "The sign-in could not be completed (the code was already used or has expired). Try again.",
    "invalid_client": "This app's registration with Microsoft was rejected; the operator must check it.",
    "unauthorized_client": "This app's registration with Microsoft was rejected; the operator must check it.",
    "invalid_scope": "Microsoft refused the requested mailbox permissions.",
    "invalid_request": "Microsoft rejected the sign-in request.",
    "temporarily_unavailable": "Microsoft sign-in is temporarily unavailable. Try again in a moment.",
    "server_error": "Microsoft sign-in failed on Microsoft's side. Try again in a moment.",
}


def readable_error(error: str) -> str:
    """A sentence for the page about OAuth error ``error``."""
    return _READABLE.get(error, "Microsoft sign-in failed.")


def safe_error_code(error: object) -> str:
    """An OAuth error code fit to show or log: short, plain ASCII word characters."""
    text = str(error or "")
    if text and len(text) <= 64 and all(c.isalnum() or c in "_-." for c in text):
        return text
    return "sign_in_failed"


def sign_in_failed(error: str) -> ProviderError:
    """The project error for an OAuth error the identity platform returned.

    ``code`` is the OAuth error code (``access_denied``, ``invalid_grant``);
    ``message`` a readable sentence for the page.
    """
    code = safe_error_code(error)
    return ProviderError(readable_error(code), code=code)


@dataclass(frozen=True)
class AuthStart:
    """A started auth-code flow: where to send the browser, and what to keep server-side.

    ``flow`` holds the PKCE ``code_verifier``, the nonce and the state: it
    is a secret until the flow is finished, so store it sealed.
    """

    authorize_url: str
    flow: dict[str, Any] = field(repr=False)

    @property
    def state(self) -> str:
        return str(self.flow["state"])


@dataclass(frozen=True)
class SignIn:
    """A finished sign-in: a fresh access token and the account's serialised token cache."""

    access_token: str = field(repr=False)
    cache_state: str = field(repr=False)
    claims: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class SilentToken:
    """An access token from the cache (or a refresh).

    ``cache_state`` is the re-serialised cache when MSAL changed it (a
    refresh rotated tokens) and None when nothing needs saving.
    """

    access_token: str = field(repr=False)
    expires_at: float
    cache_state: str | None = field(default=None, repr=False)


def without_access_tokens(cache_state: str) -> str:
    """The serialised cache minus its access tokens (after a refusal: no dead token is handed out)."""
    cache = msal.SerializableTokenCache()
    cache.deserialize(cache_state)
    for item in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
        cache.remove_at(item)
    return str(cache.serialize())


class _DiscoveryCache:
    """MSAL's ``http_client``: pass-through, except discovery GETs are remembered.

    Each ``ConfidentialClientApplication`` fetches the tenant's OpenID
    configuration when built (and instance metadata when it looks up
    aliases). Those documents change rarely, so they are kept for a day,
    process-wide; everything else goes straight to the session, with a
    timeout so a hung sign-in endpoint cannot hold a worker.
    """

    def __init__(self, session: requests.Session, *, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self._session = session
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cached: dict[str, tuple[float, requests.Response]] = {}

    @staticmethod
    def _is_discovery(url: str) -> bool:
        return "/.well-known/openid-configuration" in url or "/discovery/instance" in url

    def get(self, url: str, params: Any = None, headers: Any = None, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout_s)
        if not self._is_discovery(url):
            return self._session.get(url, params=params, headers=headers, **kwargs)
        key = f"{url}?{sorted((params or {}).items())!r}"
        now = time.monotonic()
        with self._lock:
            hit = self._cached.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        response = self._session.get(url, params=params, headers=headers, **kwargs)
        if 200 <= response.status_code < 300:
            _ = response.content  # read it now: the cached object is shared
            with self._lock:
                self._cached[key] = (now + DISCOVERY_TTL_S, response)
        return response

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None,
             **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout_s)
        return self._session.post(url, params=params, data=data, headers=headers, **kwargs)

    def close(self) -> None:
        self._session.close()


class MsalApp:
    """Our app registration at the Microsoft identity platform (or the sandbox's demo one)."""

    def __init__(self, *, client_id: str, client_secret: str, tenant: str = "common",
                 session: requests.Session | None = None, sandbox_url: str | None = None) -> None:
        self._client_id = client_id
        self._client_secret = client_secret
        self._authority = f"{AUTHORITY_HOST}/{tenant}"
        self._sandbox_url = sandbox_url
        if session is None:
            session = SandboxRoutingSession(sandbox_url) if sandbox_url else requests.Session()
        self.session = session
        self._http = _DiscoveryCache(session)

    @classmethod
    def from_settings(cls, settings: Settings) -> MsalApp:
        if not settings.ms_client_id or not settings.ms_client_secret:
            raise ConfigurationError("MS_CLIENT_ID and MS_CLIENT_SECRET are required to link Outlook accounts")
        return cls(client_id=settings.ms_client_id, client_secret=settings.ms_client_secret,
                   tenant=settings.ms_tenant, sandbox_url=settings.graph_sandbox_url)

    @property
    def uses_sandbox(self) -> bool:
        return self._sandbox_url is not None

    def start(self, redirect_uri: str, *, login_hint: str | None = None) -> AuthStart:
        """Begin an auth-code flow with PKCE, state and nonce; return the browser's URL."""
        app = self._app(msal.SerializableTokenCache())
        try:
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                list(SCOPES), redirect_uri=redirect_uri, login_hint=login_hint, response_mode="query")
        except ValueError as exc:  # MSAL's way of saying "you called me wrong"
            raise ConfigurationError(f"MSAL refused to start a sign-in: {exc}") from exc
        url = str(flow["auth_uri"])
        if self._sandbox_url:
            url = browser_authorize_url(url, self._sandbox_url)
        return AuthStart(authorize_url=url, flow=flow)

    def finish(self, flow: Mapping[str, Any], params: Mapping[str, str]) -> SignIn:
        """Redeem the callback's code for tokens; ProviderError (OAuth code) when the platform says no.

        MSAL checks the state against the flow and the id token's nonce; the
        PKCE verifier rides along with the code.
        """
        cache = msal.SerializableTokenCache()
        app = self._app(cache)
        try:
            result = app.acquire_token_by_auth_code_flow(dict(flow), dict(params))
        except ValueError as exc:
            # State mismatch, or a flow MSAL cannot use: never a partial sign-in.
            raise InputError("the sign-in response does not match the pending sign-in") from exc
        except requests.RequestException as exc:
            raise ProviderUnavailable(f"Microsoft sign-in unreachable: {type(exc).__name__}") from exc
        if "error" in result:
            error = str(result.get("error"))
            if error in _TRANSIENT_ERRORS:
                raise ProviderUnavailable(readable_error(error), code=safe_error_code(error))
            raise sign_in_failed(error)
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            raise sign_in_failed("server_error")
        claims = result.get("id_token_claims")
        return SignIn(access_token=token, cache_state=cache.serialize(),
                      claims=dict(claims) if isinstance(claims, dict) else {})

    def silent(self, cache_state: str, *, force_refresh: bool = False) -> SilentToken:
        """An access token from a serialised cache, refreshing (and rotating) when needed.

        ReauthRequired when the cache holds no usable grant or the platform
        refuses the refresh token; ProviderUnavailable for transient trouble.
        """
        cache = msal.SerializableTokenCache()
        try:
            cache.deserialize(cache_state)
        except ValueError as exc:
            raise ReauthRequired("the stored sign-in is unreadable; link the account again") from exc
        app = self._app(cache)
        try:
            accounts = app.get_accounts()
            if not accounts:
                raise ReauthRequired("no signed-in Microsoft account is stored; link the account again")
            result = app.acquire_token_silent_with_error(list(SCOPES), account=accounts[0],
                                                         force_refresh=force_refresh)
        except requests.RequestException as exc:
            raise ProviderUnavailable(f"Microsoft sign-in unreachable: {type(exc).__name__}") from exc
        if result is None:
            raise ReauthRequired("the stored sign-in has no refresh token; link the account again")
        if "error" in result:
            error = str(result.get("error"))
            if error in _REAUTH_ERRORS:
                raise ReauthRequired(readable_error(error), code="reauth_required")
            raise ProviderUnavailable(f"token refresh failed ({safe_error_code(error)})")
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderUnavailable("token refresh returned no access token")
        expires_in = result.get("expires_in")
        expires_at = time.time() + (float(expires_in) if isinstance(expires_in, int | float) else 300.0)
        changed = cache.has_state_changed
        return SilentToken(access_token=token, expires_at=expires_at,
                           cache_state=cache.serialize() if changed else None)

    def _app(self, cache: msal.SerializableTokenCache) -> msal.ConfidentialClientApplication:
        try:
            return msal.ConfidentialClientApplication(
                self._client_id, client_credential=self._client_secret, authority=self._authority,
                http_client=self._http, token_cache=cache)
        except requests.RequestException as exc:
            raise ProviderUnavailable(f"Microsoft sign-in unreachable: {type(exc).__name__}") from exc
        except ValueError as exc:
            # MSAL says "Unable to get authority configuration" for an
            # unreachable or broken discovery document as well as a bad tenant.
            raise ProviderUnavailable("Microsoft sign-in configuration could not be loaded") from exc
