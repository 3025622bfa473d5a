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

Errors use Entra's shape and codes (graph_sandbox.identity_pages, which
also draws the sign-in page); the records of sign-ins, codes and refresh
tokens are in graph_sandbox.identity_records.
"""

from __future__ import annotations

import re
import uuid
import weakref
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from graph_sandbox.app_registrations import (
    DEMO_APP,
    GRAPH_DELEGATED_SCOPES,
    OIDC_SCOPES,
    AppRegistration,
    graph_permission,
    parse_scopes,
)
from graph_sandbox.identity_pages import IdentityAnswers, unauthorized
from graph_sandbox.identity_records import (
    AuthCode,
    IdentityCounters,
    OAuthError,
    Principal,
    RefreshToken,
    Scopes,
    Session,
    missing_parameter,
)
from graph_sandbox.identity_token import TokenEndpoint
from graph_sandbox.tokens import (
    GRAPH_AUDIENCES,
    GRAPH_RESOURCE,
    InvalidToken,
    TokenSigner,
    opaque,
)

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
        self.counters = IdentityCounters()
        self._sessions: dict[str, Session] = {}
        self.codes: dict[str, AuthCode] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        # (user, app) -> time of the sign-in that restored a revoked grant.
        self.valid_from: dict[tuple[str, str], float] = {}
        self.token_endpoint = TokenEndpoint(self)
        self.answers = IdentityAnswers(state, self.counters, lambda: self.authority_host)
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

    def now(self) -> float:
        return float(self.state.clock.time())

    # -- routes ----------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/common/discovery/instance", self.instance_discovery),
            web.get("/{tenant}/v2.0/.well-known/openid-configuration", self.openid_configuration),
            web.get("/{tenant}/discovery/v2.0/keys", self.jwks),
            web.get("/{tenant}/oauth2/v2.0/authorize", self.authorize),
            web.post("/{tenant}/oauth2/v2.0/authorize", self.authorize_submit),
            web.post("/{tenant}/oauth2/v2.0/token", self.token_endpoint.answer),
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
            "liveRefreshTokens": len(self.refresh_tokens),
        })

    # -- tenants ---------------------------------------------------------------

    def tenant(self, request: web.Request) -> str:
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
            tenant_id = self.tenant(request)
        except OAuthError as exc:
            return self.answers.error_json(exc)
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
            self.tenant(request)
        except OAuthError as exc:
            return self.answers.error_json(exc)
        return web.json_response(self.signer.jwks())

    # -- authorize -------------------------------------------------------------

    def _validate_client(self, params: dict[str, str]) -> AppRegistration:
        """Errors here are shown on the page, never redirected (the URI is unverified)."""
        client_id = params.get("client_id", "")
        if not client_id:
            raise missing_parameter("client_id")
        app = self.apps.get(client_id)
        if app is None:
            raise OAuthError("unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.state.tenant_domain}'. This can happen if the application has not been "
                             "installed by the administrator of the tenant or consented to by any user in the "
                             "tenant. You may have sent your authentication request to the wrong tenant.")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            raise missing_parameter("redirect_uri")
        if not app.redirect_uri_allowed(redirect_uri):
            raise OAuthError("invalid_request", 50011,
                             f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                             f"redirect URIs configured for the application '{client_id}'. Make sure the redirect "
                             "URI sent in the request matches one added to your application in the Azure portal.")
        return app

    def _validate_request(self, app: AppRegistration, params: dict[str, str]) -> Scopes:
        """Errors here are redirected back to the (now verified) redirect URI."""
        response_type = params.get("response_type", "")
        if not response_type:
            raise missing_parameter("response_type")
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
        granted = self.check_delegated_scopes(app, scopes)
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        if challenge is None:
            if method is not None:
                raise missing_parameter("code_challenge")
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

    def check_delegated_scopes(self, app: AppRegistration, scopes: tuple[str, ...]) -> Scopes:
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
        return Scopes(names=tuple(dict.fromkeys(names)), spelled=tuple(dict.fromkeys(spelled)))

    def _authorize_request(
            self, request: web.Request) -> tuple[dict[str, str], AppRegistration, Scopes] | web.Response:
        """The checked authorize request, or the answer Entra gives to a bad one.

        An unknown client or redirect URI is shown as an error page (never
        redirect to an unverified address); any other error goes back to the app.
        """
        params = dict(request.query)
        try:
            self.tenant(request)
            app = self._validate_client(params)
        except OAuthError as exc:
            return self.answers.error_page(exc)
        try:
            return params, app, self._validate_request(app, params)
        except OAuthError as exc:
            return self.answers.redirect_error(params, exc)

    async def authorize(self, request: web.Request) -> web.Response:
        checked = self._authorize_request(request)
        if isinstance(checked, web.Response):
            return checked
        params, app, scopes = checked
        return self.answers.sign_in_page(request, app, params, scopes)

    async def authorize_submit(self, request: web.Request) -> web.Response:
        checked = self._authorize_request(request)
        if isinstance(checked, web.Response):
            return checked
        params, app, scopes = checked
        form = await request.post()
        if form.get("cancel"):
            return self.answers.redirect_error(params, OAuthError("access_denied", 65004,
                                                           "User declined to consent to access the app."))
        username = str(form.get("username", "")).strip()
        user = self.state.user_by_address(username) if username else None
        if user is None:
            message = ("Enter a valid email address." if not username else
                       f"AADSTS50034: The user account {username} does not exist in the "
                       f"{self.state.tenant_domain} directory. To sign into this application, the account "
                       "must be added to the directory.")
            return self.answers.sign_in_page(request, app, params, scopes, error=message)
        session = self._sign_in(user.id, app.client_id)
        code = opaque(64)
        self.codes[code] = AuthCode(
            client_id=app.client_id, user_id=user.id, sid=session.sid, redirect_uri=params["redirect_uri"],
            scopes=scopes, code_challenge=params.get("code_challenge"),
            code_challenge_method=params.get("code_challenge_method") or ("plain" if params.get("code_challenge")
                                                                           else None),
            nonce=params.get("nonce"), expires_at=self.now() + self.auth_code_lifetime_s)
        self._prune()
        answer = {"code": code}
        if "state" in params:
            answer["state"] = params["state"]
        answer["session_state"] = session.sid
        return self.answers.redirect(params, answer)

    def _sign_in(self, user_id: str, client_id: str) -> Session:
        now = self.now()
        if self.state.grant_revoked(user_id, client_id):
            # Signing in again is consenting again: restore this app's grant
            # (only this one), and refuse everything issued before now.
            self._restore_grant(user_id, client_id)
            self.valid_from[(user_id, client_id)] = now
        session = Session(sid=str(uuid.uuid4()), user_id=user_id, client_id=client_id, created_at=now)
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
        return session.created_at < self.valid_from.get((user_id, client_id), float("-inf"))

    # -- Graph's side: who is calling --------------------------------------------

    def authenticate(self, request: web.Request) -> Principal:
        """The caller of a Graph request, or ``web.HTTPUnauthorized`` with Graph's 401 body."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or scheme.lower() != "bearer" or not token:
            raise unauthorized("Access token is empty.")
        try:
            claims = self.signer.verify(token, now=self.now(), audiences=GRAPH_AUDIENCES)
        except InvalidToken as exc:
            raise unauthorized(exc.message) from None
        app_id = str(claims.get("appid", ""))
        if claims.get("idtyp") == "app":
            if app_id not in self.apps:
                raise unauthorized("Access token validation failure. The application was not found.")
            return Principal(user_id=None, app_id=app_id, scopes=frozenset(claims.get("roles") or ()),
                             delegated=False)
        user_id = str(claims.get("oid", ""))
        if user_id not in self.state.users:
            raise unauthorized("Access token validation failure. The user was not found in the tenant.")
        if self.revoked(user_id, app_id, claims.get("sid")):
            # What Graph answers under continuous access evaluation.
            raise unauthorized("Continuous access evaluation resulted in challenge with result: "
                                "InteractionRequired and code: TokenIssuedBeforeRevocationTimestamp",
                                claims_challenge=True)
        return Principal(user_id=user_id, app_id=app_id, scopes=frozenset(str(claims.get("scp", "")).split()),
                         delegated=True)

    # -- saved state (graph_sandbox.persistence) ------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Sign-ins, codes, refresh tokens, revocation dates and the signing key."""
        return {"signer": self.signer.private_pem(), "sessions": dict(self._sessions), "codes": dict(self.codes),
                "refresh": dict(self.refresh_tokens), "valid_from": dict(self.valid_from)}

    def import_state(self, saved: dict[str, Any]) -> None:
        self.signer = TokenSigner.from_pem(saved["signer"])
        self._sessions = dict(saved["sessions"])
        self.codes = dict(saved["codes"])
        self.refresh_tokens = dict(saved["refresh"])
        self.valid_from = dict(saved["valid_from"])

    def fingerprint(self) -> tuple[Any, ...]:
        return (len(self._sessions), len(self.codes), sum(c.redeemed for c in self.codes.values()),
                len(self.refresh_tokens), sum(r.used for r in self.refresh_tokens.values()), len(self.valid_from))

    # -- housekeeping ------------------------------------------------------------

    def _prune(self) -> None:
        """Forget expired codes and refresh tokens (cheap; runs on each sign-in)."""
        now = self.now()
        for key in [k for k, c in self.codes.items() if c.expires_at + 3600 < now]:
            del self.codes[key]
        if len(self.refresh_tokens) > 10_000:
            for key in [k for k, r in self.refresh_tokens.items() if r.expires_at < now]:
                del self.refresh_tokens[key]
