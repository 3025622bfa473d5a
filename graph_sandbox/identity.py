"""The sandbox's Microsoft identity platform (Entra ID v2.0 endpoints).

What it serves, per tenant (``common``, ``organizations``, the tenant id or
its domain)::

    GET  /{tenant}/v2.0/.well-known/openid-configuration   OIDC discovery
    GET  /{tenant}/discovery/v2.0/keys                      JWKS (RS256 key)
    GET  /{tenant}/oauth2/v2.0/authorize                    sign-in page
    POST /{tenant}/oauth2/v2.0/authorize                    username=<address> | cancel=1
    POST /{tenant}/oauth2/v2.0/token                        authorization_code,
                                                            refresh_token, client_credentials
    GET  /common/discovery/instance                         MSAL instance discovery

How a sign-in travels (the states a grant goes through)::

    authorize (GET)  --validate client_id, redirect_uri-->  error page (never redirects
        |                                                   to an unverified URI)
        |--validate response_type, scope, PKCE, prompt-->   302 redirect_uri?error=...
        v
    sign-in page --Cancel--> 302 redirect_uri?error=access_denied
        | POST username
        v
    session (sid, user, app, created_at)  -- consent is (re)given: a revoked
        |                                    grant for this app is restored
        v
    code (single use, ~10 min, bound to client, redirect_uri, PKCE challenge, nonce)
        | token: authorization_code
        v
    access token (JWT, sid) + refresh token (opaque, sid) + id_token (nonce) + client_info
        | token: refresh_token  (a new refresh token every time; the old one stays
        v                        valid until it expires, as in Entra ID, unless
                                 single_use_refresh_tokens is set)
    revoked grant (admin API: state.revoke_grant) -> refresh: invalid_grant AADSTS50173,
                                                     access tokens: 401 InvalidAuthenticationToken

A grant is revoked while ``state.grant_revoked(user, app)`` is true; a new
sign-in restores it and every token from a session older than that sign-in
stays refused, like Entra's "tokens valid from" date after a revocation.

Errors use Entra's shape (``error``, ``error_description`` with the AADSTS
code and trace/correlation ids, ``error_codes``, ...) and its codes.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
import secrets
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from graph_sandbox.app_registrations import (
    DEMO_APP,
    GRAPH_DELEGATED_SCOPES,
    OIDC_SCOPES,
    AppRegistration,
    graph_permission,
    parse_scopes,
)
from graph_sandbox.tokens import (
    GRAPH_APP_ID,
    GRAPH_AUDIENCES,
    GRAPH_RESOURCE,
    InvalidToken,
    TokenSigner,
    client_info,
    opaque,
    s256_challenge,
)

# ---------------------------------------------------------------------------
# The caller of a Graph request
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is calling Graph: a user through an app (delegated) or the app alone."""

    user_id: str | None
    app_id: str
    scopes: frozenset[str]
    delegated: bool


@dataclass
class _Session:
    sid: str
    user_id: str
    client_id: str
    created_at: float


@dataclass(frozen=True)
class _Scopes:
    names: tuple[str, ...]     # Graph permission names and OIDC scopes
    spelled: tuple[str, ...]   # as the client asked, for the response's "scope"


@dataclass
class _AuthCode:
    client_id: str
    user_id: str
    sid: str
    redirect_uri: str
    scopes: _Scopes
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    expires_at: float
    redeemed: bool = False


@dataclass
class _RefreshToken:
    client_id: str
    user_id: str
    sid: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    used: bool = False


@dataclass
class _Counters:
    sign_ins: int = 0
    tokens_issued: int = 0
    refreshes: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class OAuthError(Exception):
    """An Entra error answer (token endpoint JSON, or a redirect/error page at authorize)."""

    def __init__(self, error: str, code: int, message: str, status: int = 400) -> None:
        super().__init__(f"AADSTS{code}: {message}")
        self.error = error
        self.code = code
        self.message = message
        self.status = status


def _missing(name: str) -> OAuthError:
    return OAuthError("invalid_request", 900144, f"The request body must contain the following parameter: '{name}'.")


# ---------------------------------------------------------------------------
# The identity platform
# ---------------------------------------------------------------------------


_PLATFORMS: weakref.WeakKeyDictionary[Any, IdentityPlatform] = weakref.WeakKeyDictionary()


def platform_for(state: Any) -> IdentityPlatform | None:
    """The identity platform built on ``state`` (other services authenticate through it)."""
    return _PLATFORMS.get(state)


class IdentityPlatform:
    """Entra ID v2.0 endpoints for the sandbox tenant, and Graph's token check."""

    def __init__(self, state: Any, *, apps: Iterable[AppRegistration] | None = None,
                 signer: TokenSigner | None = None) -> None:
        self.state = state
        self.apps: dict[str, AppRegistration] = {a.client_id: a for a in (apps or (DEMO_APP,))}
        self.signer = signer or TokenSigner()
        self.counters = _Counters()
        self._sessions: dict[str, _Session] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        # (user, app) -> time of the sign-in that restored a revoked grant.
        self._valid_from: dict[tuple[str, str], float] = {}
        _PLATFORMS[state] = self

    # -- settings (SandboxConfig fields, with Entra's defaults) ---------------

    def _setting(self, name: str, default: Any) -> Any:
        return getattr(self.state.config, name, default)

    @property
    def access_token_lifetime_s(self) -> float:
        return float(self._setting("access_token_lifetime_s", 3600))

    @property
    def refresh_token_lifetime_s(self) -> float:
        return float(self._setting("refresh_token_lifetime_s", 90 * 24 * 3600))

    @property
    def auth_code_lifetime_s(self) -> float:
        return float(self._setting("auth_code_lifetime_s", 600))

    @property
    def single_use_refresh_tokens(self) -> bool:
        return bool(self._setting("single_use_refresh_tokens", False))

    @property
    def authority_host(self) -> str:
        """The host the discovery document names: the real one, so MSAL accepts it."""
        return str(self._setting("authority_host", "https://login.microsoftonline.com")).rstrip("/")

    def _now(self) -> float:
        return float(self.state.clock.time())

    # -- routes ----------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/common/discovery/instance", self.instance_discovery),
            web.get("/{tenant}/v2.0/.well-known/openid-configuration", self.openid_configuration),
            web.get("/{tenant}/discovery/v2.0/keys", self.jwks),
            web.get("/{tenant}/oauth2/v2.0/authorize", self.authorize),
            web.post("/{tenant}/oauth2/v2.0/authorize", self.authorize_submit),
            web.post("/{tenant}/oauth2/v2.0/token", self.token),
            web.get("/sandbox/identity", self.admin_view),
        ]

    async def admin_view(self, request: web.Request) -> web.Response:
        """Sandbox-only: app registrations, lifetimes and counters (for people and tests)."""
        return web.json_response({
            "apps": [{"clientId": a.client_id, "displayName": a.display_name, "confidential": a.client_secret
                      is not None, "redirectUris": list(a.redirect_uris), "requirePkce": a.require_pkce,
                      "delegatedScopes": sorted(a.delegated_scopes), "appRoles": sorted(a.app_roles)}
                     for a in self.apps.values()],
            "accessTokenLifetimeS": self.access_token_lifetime_s,
            "refreshTokenLifetimeS": self.refresh_token_lifetime_s,
            "authCodeLifetimeS": self.auth_code_lifetime_s,
            "singleUseRefreshTokens": self.single_use_refresh_tokens,
            "signIns": self.counters.sign_ins, "tokensIssued": self.counters.tokens_issued,
            "refreshes": self.counters.refreshes, "errors": dict(sorted(self.counters.errors.items())),
            "liveRefreshTokens": len(self._refresh),
        })

    # -- tenants ---------------------------------------------------------------

    def _tenant(self, request: web.Request) -> str:
        """Validate the tenant path segment; return the tenant id."""
        tenant = request.match_info["tenant"]
        known = {self.state.tenant_id.lower(), str(self.state.tenant_domain).lower(), "common", "organizations"}
        if tenant.lower() not in known:
            raise OAuthError("invalid_tenant", 90002,
                             f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                             "and are signing into the correct cloud.")
        return str(self.state.tenant_id)

    # -- discovery ------------------------------------------------------------

    async def instance_discovery(self, request: web.Request) -> web.Response:
        host = urlsplit(self.authority_host).hostname or "login.microsoftonline.com"
        return web.json_response({
            "tenant_discovery_endpoint": f"{self.authority_host}/common/v2.0/.well-known/openid-configuration",
            "api-version": request.query.get("api-version", "1.1"),
            "metadata": [{
                "preferred_network": host,
                "preferred_cache": "login.windows.net",
                "aliases": [host, "login.windows.net", "login.microsoft.com", "sts.windows.net"],
            }],
        })

    async def openid_configuration(self, request: web.Request) -> web.Response:
        try:
            tenant_id = self._tenant(request)
        except OAuthError as exc:
            return self._error_json(exc)
        segment = request.match_info["tenant"]
        base = f"{self.authority_host}/{segment}"
        # For common/organizations Entra publishes the literal template.
        issuer_tenant = tenant_id if segment.lower() not in ("common", "organizations") else "{tenantid}"
        return web.json_response({
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.authority_host}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "claims_supported": ["sub", "iss", "cloud_instance_name", "aud", "exp", "iat", "auth_time",
                                 "acr", "nonce", "preferred_username", "name", "tid", "ver", "oid", "email"],
            "tenant_region_scope": None,
            "cloud_instance_name": "microsoftonline.com",
            "msgraph_host": "graph.microsoft.com",
        })

    async def jwks(self, request: web.Request) -> web.Response:
        try:
            self._tenant(request)
        except OAuthError as exc:
            return self._error_json(exc)
        return web.json_response(self.signer.jwks())

    # -- authorize -------------------------------------------------------------

    def _validate_client(self, params: dict[str, str]) -> AppRegistration:
        """Errors here are shown on the page, never redirected (the URI is unverified)."""
        client_id = params.get("client_id", "")
        if not client_id:
            raise _missing("client_id")
        app = self.apps.get(client_id)
        if app is None:
            raise OAuthError("unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.state.tenant_domain}'. This can happen if the application has not been "
                             "installed by the administrator of the tenant or consented to by any user in the "
                             "tenant. You may have sent your authentication request to the wrong tenant.")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            raise _missing("redirect_uri")
        if not app.redirect_uri_allowed(redirect_uri):
            raise OAuthError("invalid_request", 50011,
                             f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                             f"redirect URIs configured for the application '{client_id}'. Make sure the redirect "
                             "URI sent in the request matches one added to your application in the Azure portal.")
        return app

    def _validate_request(self, app: AppRegistration, params: dict[str, str]) -> _Scopes:
        """Errors here are redirected back to the (now verified) redirect URI."""
        response_type = params.get("response_type", "")
        if not response_type:
            raise _missing("response_type")
        if response_type.split() != ["code"]:
            if "token" in response_type.split():
                raise OAuthError("unsupported_response_type", 700051,
                                 "response_type 'token' is not enabled for the application.")
            if "id_token" in response_type.split():
                raise OAuthError("unsupported_response_type", 700054,
                                 "response_type 'id_token' is not enabled for the application.")
            raise OAuthError("unsupported_response_type", 70005,
                             f"The provided value for the input parameter 'response_type' is not valid: "
                             f"'{response_type}'.")
        response_mode = params.get("response_mode", "query")
        if response_mode not in ("query", "fragment", "form_post"):
            raise OAuthError("invalid_request", 900144,
                             f"The provided value for the input parameter 'response_mode' is not valid: "
                             f"'{response_mode}'.")
        scopes = parse_scopes(params.get("scope", ""))
        if not scopes:
            raise OAuthError("invalid_request", 900144,
                             "The request body must contain the following parameter: 'scope'.")
        granted = self._check_delegated_scopes(app, scopes)
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        if challenge is None:
            if method is not None:
                raise _missing("code_challenge")
            if app.require_pkce:
                raise OAuthError("invalid_request", 9002325,
                                 "Proof Key for Code Exchange is required for cross-origin authorization "
                                 "code redemption.")
        else:
            if (method or "plain") not in ("S256", "plain"):
                raise OAuthError("invalid_request", 50149, "Invalid Code_Challenge_method parameter.")
            if not 43 <= len(challenge) <= 128 or not re.fullmatch(r"[A-Za-z0-9\-._~]+", challenge):
                raise OAuthError("invalid_request", 501491, "Invalid size of Code_Challenge parameter.")
        if params.get("prompt") == "none":
            # No browser session cookies in the sandbox: a silent request cannot succeed.
            raise OAuthError("login_required", 50058,
                             "A silent sign-in request was sent but no user is signed in.")
        if len(params.get("nonce", "")) > 512 or len(params.get("state", "")) > 4096:
            raise OAuthError("invalid_request", 90015, "Requested query string is too long.")
        return granted

    def _check_delegated_scopes(self, app: AppRegistration, scopes: tuple[str, ...]) -> _Scopes:
        """Resolve requested scopes to Graph permission names (plus OIDC scopes).

        The token response echoes each scope as the client spelled it
        (qualified or not) so MSAL's cache finds the token again.
        """
        names: list[str] = []
        spelled: list[str] = []
        for scope in scopes:
            if scope in OIDC_SCOPES:
                names.append(scope)
                if scope != "offline_access":
                    spelled.append(scope)
                continue
            name = graph_permission(scope)
            if name == ".default":
                names.extend(sorted(app.delegated_scopes))
                spelled.extend(f"{GRAPH_RESOURCE}/{n}" for n in sorted(app.delegated_scopes))
            elif name in GRAPH_DELEGATED_SCOPES:
                names.append(name)
                spelled.append(scope)
            else:
                raise OAuthError("invalid_scope", 70011,
                                 f"The provided value for the input parameter 'scope' is not valid. "
                                 f"The scope '{scope}' does not exist.")
        if not any(n not in OIDC_SCOPES for n in names):
            # Only OIDC scopes: Entra gives a token for Graph's User.Read.
            names.append("User.Read")
            spelled.append("User.Read")
        return _Scopes(names=tuple(dict.fromkeys(names)), spelled=tuple(dict.fromkeys(spelled)))

    def _authorize_request(
            self, request: web.Request) -> tuple[dict[str, str], AppRegistration, _Scopes] | web.Response:
        """The checked authorize request, or the answer Entra gives to a bad one.

        An unknown client or redirect URI is shown as an error page (never
        redirect to an unverified address); any other error goes back to the app.
        """
        params = dict(request.query)
        try:
            self._tenant(request)
            app = self._validate_client(params)
        except OAuthError as exc:
            return self._error_page(exc)
        try:
            return params, app, self._validate_request(app, params)
        except OAuthError as exc:
            return self._redirect_error(params, exc)

    async def authorize(self, request: web.Request) -> web.Response:
        checked = self._authorize_request(request)
        if isinstance(checked, web.Response):
            return checked
        params, app, scopes = checked
        return self._sign_in_page(request, app, params, scopes)

    async def authorize_submit(self, request: web.Request) -> web.Response:
        checked = self._authorize_request(request)
        if isinstance(checked, web.Response):
            return checked
        params, app, scopes = checked
        form = await request.post()
        if form.get("cancel"):
            return self._redirect_error(params, OAuthError("access_denied", 65004,
                                                           "User declined to consent to access the app."))
        username = str(form.get("username", "")).strip()
        user = self.state.user_by_address(username) if username else None
        if user is None:
            message = ("Enter a valid email address." if not username else
                       f"AADSTS50034: The user account {username} does not exist in the "
                       f"{self.state.tenant_domain} directory. To sign into this application, the account "
                       "must be added to the directory.")
            return self._sign_in_page(request, app, params, scopes, error=message)
        session = self._sign_in(user.id, app.client_id)
        code = opaque(64)
        self._codes[code] = _AuthCode(
            client_id=app.client_id, user_id=user.id, sid=session.sid, redirect_uri=params["redirect_uri"],
            scopes=scopes, code_challenge=params.get("code_challenge"),
            code_challenge_method=params.get("code_challenge_method") or ("plain" if params.get("code_challenge")
                                                                           else None),
            nonce=params.get("nonce"), expires_at=self._now() + self.auth_code_lifetime_s)
        self._prune()
        answer = {"code": code}
        if "state" in params:
            answer["state"] = params["state"]
        answer["session_state"] = session.sid
        return self._redirect(params, answer)

    def _sign_in(self, user_id: str, client_id: str) -> _Session:
        now = self._now()
        if self.state.grant_revoked(user_id, client_id):
            # Signing in again is consenting again: restore this app's grant
            # (only this one), and refuse everything issued before now.
            self._restore_grant(user_id, client_id)
            self._valid_from[(user_id, client_id)] = now
        session = _Session(sid=str(uuid.uuid4()), user_id=user_id, client_id=client_id, created_at=now)
        self._sessions[session.sid] = session
        self.counters.sign_ins += 1
        return session

    def _restore_grant(self, user_id: str, client_id: str) -> None:
        self.state.restore_grant(user_id, client_id)
        if self.state.grant_revoked(user_id, client_id):
            # Revoked for every app at once: keep the other apps revoked.
            self.state.restore_grant(user_id)
            for other in self.apps:
                if other != client_id:
                    self.state.revoke_grant(user_id, other)

    def revoked(self, user_id: str, client_id: str, sid: str | None) -> bool:
        """True when tokens of session ``sid`` must be refused for (user, app)."""
        if self.state.grant_revoked(user_id, client_id):
            return True
        session = self._sessions.get(sid or "")
        if session is None:
            return True
        return session.created_at < self._valid_from.get((user_id, client_id), float("-inf"))

    # -- token -------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        try:
            self._tenant(request)
            if not request.content_type == "application/x-www-form-urlencoded":
                raise _missing("grant_type")
            form = {k: str(v) for k, v in (await request.post()).items()}
            app = self._authenticate_client(request, form)
            grant_type = form.get("grant_type", "")
            if not grant_type:
                raise _missing("grant_type")
            if grant_type == "authorization_code":
                body = self._redeem_code(app, form)
            elif grant_type == "refresh_token":
                body = self._redeem_refresh_token(app, form)
            elif grant_type == "client_credentials":
                body = self._client_credentials(request, app, form)
            else:
                raise OAuthError("unsupported_grant_type", 70003,
                                 f"The app requested an unsupported grant type '{grant_type}'.")
        except OAuthError as exc:
            return self._error_json(exc)
        self.counters.tokens_issued += 1
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate_client(self, request: web.Request, form: dict[str, str]) -> AppRegistration:
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError("invalid_client", 7000216,
                                 "'client_assertion', 'client_secret' or 'request' is required for the "
                                 "'client_credentials' grant type.", status=401) from None
            basic_id, _, basic_secret = decoded.partition(":")
            client_id = client_id or basic_id
            secret = secret or basic_secret
        if not client_id:
            raise _missing("client_id")
        app = self.apps.get(client_id)
        if app is None:
            raise OAuthError("unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.state.tenant_domain}'. This can happen if the application has not been "
                             "installed by the administrator of the tenant or consented to by any user in the "
                             "tenant. You may have sent your authentication request to the wrong tenant.")
        if app.client_secret is not None:
            if not secret:
                raise OAuthError("invalid_client", 7000218,
                                 "The request body must contain the following parameter: 'client_assertion' "
                                 "or 'client_secret'.", status=401)
            if not secrets.compare_digest(secret.encode(), app.client_secret.encode()):
                raise OAuthError("invalid_client", 7000215,
                                 "Invalid client secret provided. Ensure the secret being sent in the request "
                                 f"is the client secret value, not the client secret ID, for a secret added to "
                                 f"app '{client_id}'.", status=401)
        elif secret:
            raise OAuthError("invalid_client", 700025,
                             "Client is public so neither 'client_assertion' nor 'client_secret' should be "
                             "presented.", status=401)
        return app

    def _redeem_code(self, app: AppRegistration, form: dict[str, str]) -> dict[str, Any]:
        code_value = form.get("code", "")
        if not code_value:
            raise _missing("code")
        code = self._codes.get(code_value)
        now = self._now()
        if code is None:
            raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if code.redeemed:
            raise OAuthError("invalid_grant", 54005,
                             "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                             "code or use an existing refresh token.")
        if now >= code.expires_at:
            raise OAuthError("invalid_grant", 70008,
                             "The provided authorization code or refresh token has expired due to inactivity. "
                             "Send a new interactive authorization request for this user and resource.")
        if code.client_id != app.client_id:
            raise OAuthError("invalid_grant", 70000,
                             "The provided value for the 'code' parameter is not valid. The code was issued "
                             "to another client.")
        redirect_uri = form.get("redirect_uri", "")
        if redirect_uri != code.redirect_uri:
            raise OAuthError("invalid_grant", 50011,
                             f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                             f"redirect URI used to obtain the authorization code ('{code.redirect_uri}').")
        if code.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            expected = (s256_challenge(verifier) if code.code_challenge_method == "S256" and verifier.isascii()
                        else verifier)
            if not verifier or not secrets.compare_digest(expected, code.code_challenge):
                raise OAuthError("invalid_grant", 501481,
                                 "The Code_Verifier does not match the code_challenge supplied in the "
                                 "authorization request.")
        code.redeemed = True
        if self.revoked(code.user_id, app.client_id, code.sid):
            raise self._revoked_error(code.user_id, app.client_id, now)
        return self._issue(app, code.user_id, code.sid, code.scopes, code.scopes.names, nonce=code.nonce,
                           include_client_info=form.get("client_info") == "1")

    def _redeem_refresh_token(self, app: AppRegistration, form: dict[str, str]) -> dict[str, Any]:
        value = form.get("refresh_token", "")
        if not value:
            raise _missing("refresh_token")
        record = self._refresh.get(value)
        now = self._now()
        if record is None:
            raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if record.client_id != app.client_id:
            raise OAuthError("invalid_grant", 70000,
                             "The provided grant is invalid or malformed: the refresh token was issued to "
                             "another client.")
        if now >= record.expires_at:
            days = self.refresh_token_lifetime_s / 86400
            raise OAuthError("invalid_grant", 700082,
                             f"The refresh token has expired due to inactivity. The token was issued on "
                             f"{_iso(record.issued_at)} and was inactive for {days:g} days.")
        if self.revoked(record.user_id, app.client_id, record.sid):
            raise self._revoked_error(record.user_id, app.client_id, record.issued_at)
        if record.used and self.single_use_refresh_tokens:
            raise OAuthError("invalid_grant", 70000,
                             "The provided grant is invalid or malformed: this refresh token was already "
                             "redeemed (the sandbox runs with single-use refresh tokens).")
        requested = parse_scopes(form.get("scope", ""))
        scopes = _Scopes(names=record.scopes, spelled=tuple(s for s in record.scopes if s != "offline_access"))
        if requested:
            scopes = self._check_delegated_scopes(app, requested)
            asked = {graph_permission(s) for s in requested if s not in OIDC_SCOPES}
            missing = [s for s in scopes.names if s in asked and s not in record.scopes]
            if missing:
                raise OAuthError("invalid_grant", 65001,
                                 f"The user or administrator has not consented to use the application with ID "
                                 f"'{app.client_id}' named '{app.display_name}'. Send an interactive "
                                 "authorization request for this user and resource.")
        record.used = True
        self.counters.refreshes += 1
        return self._issue(app, record.user_id, record.sid, scopes, record.scopes, nonce=None,
                           include_client_info=form.get("client_info") == "1")

    def _client_credentials(self, request: web.Request, app: AppRegistration, form: dict[str, str]) -> dict[str, Any]:
        segment = request.match_info["tenant"].lower()
        if segment in ("common", "organizations", "consumers"):
            raise OAuthError("invalid_request", 9001023,
                             "The grant type is not supported over the /common or /consumers endpoints. "
                             "Please use the /organizations or tenant-specific endpoint.")
        if app.client_secret is None:
            raise OAuthError("unauthorized_client", 700025,
                             "Client is public so neither 'client_assertion' nor 'client_secret' should be "
                             "presented.")
        scope = form.get("scope", "").strip()
        if not scope:
            raise _missing("scope")
        if scope.split() != [f"{GRAPH_RESOURCE}/.default"] and scope.split() != [f"{GRAPH_APP_ID}/.default"]:
            raise OAuthError("invalid_scope", 1002012,
                             f"The provided value for scope {scope} is not valid. Client credential flows must "
                             "have a scope value with /.default suffixed to the resource identifier "
                             "(application ID URI).")
        now = self._now()
        lifetime = self.access_token_lifetime_s
        claims = {
            "aud": GRAPH_RESOURCE,
            "iss": f"https://sts.windows.net/{self.state.tenant_id}/",
            "iat": int(now), "nbf": int(now), "exp": int(now + lifetime),
            "app_displayname": app.display_name,
            "appid": app.client_id, "appidacr": "1",
            "idp": f"https://sts.windows.net/{self.state.tenant_id}/",
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app.client_id}")),
            "roles": sorted(app.app_roles),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app.client_id}")),
            "tid": self.state.tenant_id,
            "uti": opaque(16), "ver": "1.0",
        }
        return {"token_type": "Bearer", "expires_in": int(lifetime), "ext_expires_in": int(lifetime),
                "access_token": self.signer.sign(claims)}

    def _revoked_error(self, user_id: str, client_id: str, issued_at: float) -> OAuthError:
        valid_from = self._valid_from.get((user_id, client_id), self._now())
        return OAuthError("invalid_grant", 50173,
                          "The provided grant has expired due to it being revoked, a fresh auth token is "
                          "needed. The user might have changed or reset their password. The grant was issued "
                          f"on '{_iso(issued_at)}' and the TokensValidFrom date (before which tokens are not "
                          f"valid) for this user is '{_iso(valid_from)}'.")

    def _issue(self, app: AppRegistration, user_id: str, sid: str, scopes: _Scopes, grant: tuple[str, ...], *,
               nonce: str | None, include_client_info: bool) -> dict[str, Any]:
        """The token response: access token for ``scopes``; a refresh token for the whole ``grant``."""
        user = self.state.users[user_id]
        now = self._now()
        lifetime = self.access_token_lifetime_s
        tenant_id = self.state.tenant_id
        graph_scopes = [s for s in scopes.names if s not in OIDC_SCOPES]
        oidc = [s for s in scopes.names if s in ("openid", "profile", "email")]
        access = {
            "aud": GRAPH_RESOURCE,
            "iss": f"https://sts.windows.net/{tenant_id}/",
            "iat": int(now), "nbf": int(now), "exp": int(now + lifetime),
            "acr": "1", "amr": ["pwd"],
            "app_displayname": app.display_name, "appid": app.client_id, "appidacr": "1",
            "family_name": user.surname, "given_name": user.given_name,
            "idtyp": "user", "name": user.display_name, "oid": user.id,
            "scp": " ".join(graph_scopes + oidc),
            "sid": sid, "sub": user.id, "tid": tenant_id,
            "unique_name": user.user_principal_name, "upn": user.user_principal_name,
            "uti": opaque(16), "ver": "1.0",
        }
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(scopes.spelled),
            "expires_in": int(lifetime),
            "ext_expires_in": int(lifetime),
            "access_token": self.signer.sign(access),
        }
        if "offline_access" in grant:
            refresh = opaque(96)
            self._refresh[refresh] = _RefreshToken(
                client_id=app.client_id, user_id=user_id, sid=sid, scopes=grant, issued_at=now,
                expires_at=now + self.refresh_token_lifetime_s)
            body["refresh_token"] = refresh
        if "openid" in scopes.names:
            id_claims: dict[str, Any] = {
                "aud": app.client_id,
                "iss": f"{self.authority_host}/{tenant_id}/v2.0",
                "iat": int(now), "nbf": int(now), "exp": int(now + 3600),
                "name": user.display_name, "oid": user.id,
                "preferred_username": user.user_principal_name,
                "sid": sid, "sub": _pairwise_sub(user.id, app.client_id), "tid": tenant_id,
                "uti": opaque(16), "ver": "2.0",
            }
            if "email" in scopes.names:
                id_claims["email"] = user.mail
            if nonce is not None:
                id_claims["nonce"] = nonce
            body["id_token"] = self.signer.sign(id_claims)
        if include_client_info:
            body["client_info"] = client_info(user.id, tenant_id)
        return body

    # -- Graph's side: who is calling --------------------------------------------

    def authenticate(self, request: web.Request) -> Principal:
        """The caller of a Graph request, or ``web.HTTPUnauthorized`` with Graph's 401 body."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or scheme.lower() != "bearer" or not token:
            raise _unauthorized("Access token is empty.")
        try:
            claims = self.signer.verify(token, now=self._now(), audiences=GRAPH_AUDIENCES)
        except InvalidToken as exc:
            raise _unauthorized(exc.message) from None
        app_id = str(claims.get("appid", ""))
        if claims.get("idtyp") == "app":
            if app_id not in self.apps:
                raise _unauthorized("Access token validation failure. The application was not found.")
            return Principal(user_id=None, app_id=app_id, scopes=frozenset(claims.get("roles") or ()),
                             delegated=False)
        user_id = str(claims.get("oid", ""))
        if user_id not in self.state.users:
            raise _unauthorized("Access token validation failure. The user was not found in the tenant.")
        if self.revoked(user_id, app_id, claims.get("sid")):
            # What Graph answers under continuous access evaluation.
            raise _unauthorized("Continuous access evaluation resulted in challenge with result: "
                                "InteractionRequired and code: TokenIssuedBeforeRevocationTimestamp",
                                claims_challenge=True)
        return Principal(user_id=user_id, app_id=app_id, scopes=frozenset(str(claims.get("scp", "")).split()),
                         delegated=True)

    # -- saved state (graph_sandbox.persistence) ------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Sign-ins, codes, refresh tokens, revocation dates and the signing key."""
        return {"signer": self.signer.private_pem(), "sessions": dict(self._sessions), "codes": dict(self._codes),
                "refresh": dict(self._refresh), "valid_from": dict(self._valid_from)}

    def import_state(self, saved: dict[str, Any]) -> None:
        self.signer = TokenSigner.from_pem(saved["signer"])
        self._sessions = dict(saved["sessions"])
        self._codes = dict(saved["codes"])
        self._refresh = dict(saved["refresh"])
        self._valid_from = dict(saved["valid_from"])

    def fingerprint(self) -> tuple[Any, ...]:
        return (len(self._sessions), len(self._codes), sum(c.redeemed for c in self._codes.values()),
                len(self._refresh), sum(r.used for r in self._refresh.values()), len(self._valid_from))

    # -- housekeeping ------------------------------------------------------------

    def _prune(self) -> None:
        """Forget expired codes and refresh tokens (cheap; runs on each sign-in)."""
        now = self._now()
        for key in [k for k, c in self._codes.items() if c.expires_at + 3600 < now]:
            del self._codes[key]
        if len(self._refresh) > 10_000:
            for key in [k for k, r in self._refresh.items() if r.expires_at < now]:
                del self._refresh[key]

    # -- answers -----------------------------------------------------------------

    def _error_body(self, exc: OAuthError) -> dict[str, Any]:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        key = f"{exc.error}:{exc.code}"
        self.counters.errors[key] = self.counters.errors.get(key, 0) + 1
        return {
            "error": exc.error,
            "error_description": f"AADSTS{exc.code}: {exc.message}\r\nTrace ID: {trace}\r\n"
                                 f"Correlation ID: {correlation}\r\nTimestamp: {stamp}",
            "error_codes": [exc.code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"{self.authority_host}/error?code={exc.code}",
        }

    def _error_json(self, exc: OAuthError) -> web.Response:
        return web.json_response(self._error_body(exc), status=exc.status,
                                 headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _error_page(self, exc: OAuthError) -> web.Response:
        body = self._error_body(exc)
        page = _PAGE.format(title="Sign in", body=(
            "<h1>Sorry, but we're having trouble signing you in.</h1>"
            f"<p class='err' data-error='{html.escape(exc.error)}' data-code='AADSTS{exc.code}'>"
            f"AADSTS{exc.code}: {html.escape(exc.message)}</p>"
            f"<p class='small'>Trace ID: {body['trace_id']}<br>Correlation ID: {body['correlation_id']}</p>"))
        return web.Response(text=page, status=400, content_type="text/html")

    def _redirect_error(self, params: dict[str, str], exc: OAuthError) -> web.Response:
        body = self._error_body(exc)
        answer = {"error": exc.error, "error_description": body["error_description"],
                  "error_uri": body["error_uri"]}
        if "state" in params:
            answer["state"] = params["state"]
        return self._redirect(params, answer)

    def _redirect(self, params: dict[str, str], answer: dict[str, str]) -> web.Response:
        redirect_uri = params["redirect_uri"]
        mode = params.get("response_mode", "query")
        if mode not in ("query", "fragment", "form_post"):
            mode = "query"
        if mode == "form_post":
            inputs = "".join(f"<input type='hidden' name='{html.escape(k)}' value='{html.escape(v)}'>"
                             for k, v in answer.items())
            page = _PAGE.format(title="Working...", body=(
                f"<form method='POST' name='hiddenform' action='{html.escape(redirect_uri)}'>{inputs}"
                "<noscript><p>Script is disabled. Click Submit to continue.</p>"
                "<input type='submit' value='Submit'></noscript></form>"
                "<script>document.forms[0].submit();</script>"))
            return web.Response(text=page, content_type="text/html")
        parts = urlsplit(redirect_uri)
        if mode == "fragment":
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, urlencode(answer)))
        else:
            query = parse_qsl(parts.query, keep_blank_values=True) + list(answer.items())
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})

    def _sign_in_page(self, request: web.Request, app: AppRegistration, params: dict[str, str],
                      scopes: _Scopes, *, error: str | None = None) -> web.Response:
        hint = params.get("login_hint", "").lower()
        action = html.escape(str(request.rel_url))
        rows = []
        for user in sorted(self.state.users.values(), key=lambda u: u.mail.lower()):
            chosen = " chosen" if hint and hint in (user.mail.lower(), user.user_principal_name.lower()) else ""
            rows.append(
                f"<li><button class='user{chosen}' type='submit' name='username' "
                f"value='{html.escape(user.user_principal_name)}'>"
                f"<b>{html.escape(user.display_name)}</b><br><span>{html.escape(user.mail)}</span>"
                "</button></li>")
        permissions = "".join(f"<li>{html.escape(s)}</li>" for s in scopes.names if s not in OIDC_SCOPES)
        err = f"<p class='err' role='alert'>{html.escape(error)}</p>" if error else ""
        body = (
            f"<div class='brand'>Graph sandbox &middot; {html.escape(str(self.state.tenant_domain))}</div>"
            "<h1>Pick an account</h1>"
            f"<p><b>{html.escape(app.display_name)}</b> wants to sign you in and access:</p>"
            f"<ul class='perm'>{permissions}</ul>{err}"
            f"<form method='POST' action='{action}'><ul class='users'>{''.join(rows)}</ul></form>"
            f"<form method='POST' action='{action}' class='other'>"
            "<label for='username'>Or type an address</label>"
            f"<input id='username' name='username' type='email' autocomplete='username' "
            f"value='{html.escape(params.get('login_hint', ''))}' placeholder='someone@example.com'>"
            "<button type='submit'>Next</button></form>"
            f"<form method='POST' action='{action}'><button class='cancel' type='submit' name='cancel' "
            "value='1'>Cancel</button></form>")
        return web.Response(text=_PAGE.format(title="Sign in to your account", body=body),
                            content_type="text/html", headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _pairwise_sub(user_id: str, client_id: str) -> str:
    # Entra's id_token "sub" is pairwise per app; derive one stably.
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"{user_id}:{client_id}").bytes
    return base64.urlsafe_b64encode(digest + digest[:8]).rstrip(b"=").decode("ascii")


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%m/%d/%Y %H:%M:%S")


def graph_error_body(code: str, message: str) -> dict[str, Any]:
    """Graph's error envelope (``{"error": {"code", "message", "innerError"}}``)."""
    request_id = str(uuid.uuid4())
    return {"error": {"code": code, "message": message, "innerError": {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": request_id, "client-request-id": request_id}}}


def _unauthorized(message: str, *, claims_challenge: bool = False) -> web.HTTPUnauthorized:
    challenge = ('Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                 f'client_id="{GRAPH_APP_ID}"')
    if claims_challenge:
        claims = base64.b64encode(json.dumps(
            {"access_token": {"nbf": {"essential": True, "value": "0"}}}).encode()).decode()
        challenge += f', error="insufficient_claims", claims="{claims}"'
    return web.HTTPUnauthorized(
        text=json.dumps(graph_error_body("InvalidAuthenticationToken", message)),
        content_type="application/json",
        headers={"WWW-Authenticate": challenge})


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:"Segoe UI",system-ui,sans-serif;background:#f2f2f2;margin:0;display:flex;justify-content:center}}
main{{background:#fff;margin-top:8vh;padding:32px 44px;width:min(440px,92vw);box-shadow:0 2px 6px rgba(0,0,0,.2)}}
h1{{font-size:24px;font-weight:600;margin:12px 0}} .brand{{color:#666;font-size:13px}}
ul{{list-style:none;padding:0}} .perm li{{font-size:14px;color:#333}} .perm li:before{{content:"\\2713  "}}
button.user{{width:100%;text-align:left;background:none;border:0;border-bottom:1px solid #ddd;padding:10px 4px;
cursor:pointer;font:inherit}} button.user:hover,button.user.chosen{{background:#eef4fb}}
button.user span{{color:#555;font-size:13px}} .other{{margin-top:16px}}
.other input{{width:100%;padding:6px 0;border:0;border-bottom:1px solid #666;font:inherit;margin:6px 0 12px}}
.other button,.cancel{{background:#0067b8;color:#fff;border:0;padding:6px 20px;font:inherit;cursor:pointer}}
.cancel{{background:#ccc;color:#000;margin-top:8px}} .err{{color:#c50f1f}} .small{{font-size:12px;color:#666}}
</style></head><body><main>{body}</main></body></html>
"""
