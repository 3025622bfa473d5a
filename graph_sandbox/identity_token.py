"""The identity platform's token endpoint: ``POST /{tenant}/oauth2/v2.0/token``.

Three grants, each checked as Entra checks it, with its AADSTS code:

* ``authorization_code``: the code is single use, unexpired, issued to this
  client for this redirect URI, and the PKCE verifier matches its challenge
  (S256 or plain). Redeeming it issues the access token, a refresh token
  when ``offline_access`` was granted, and an id_token for ``openid``.
* ``refresh_token``: issued to this client, unexpired, its session not
  revoked (``IdentityPlatform.revoked``), and the scopes asked for within
  the ones consented. A new refresh token every time; the old one stays
  valid unless the sandbox runs with single-use refresh tokens.
* ``client_credentials``: a confidential app on a tenant endpoint, scope
  ``https://graph.microsoft.com/.default``; an app-only token with the
  app's roles.

The client authenticates with ``client_secret`` in the form or HTTP Basic;
a public client must not send one.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from graph_sandbox.app_registrations import OIDC_SCOPES, AppRegistration, graph_permission, parse_scopes
from graph_sandbox.identity_records import OAuthError, RefreshToken, Scopes, missing_parameter
from graph_sandbox.tokens import GRAPH_APP_ID, GRAPH_RESOURCE, client_info, opaque, s256_challenge

if TYPE_CHECKING:
    from graph_sandbox.identity import IdentityPlatform


class TokenEndpoint:
    """The token endpoint of one identity platform (see the module docstring)."""

    def __init__(self, platform: IdentityPlatform) -> None:
        self._platform = platform

    async def answer(self, request: web.Request) -> web.Response:
        try:
            self._platform.tenant(request)
            if not request.content_type == "application/x-www-form-urlencoded":
                raise missing_parameter("grant_type")
            form = {k: str(v) for k, v in (await request.post()).items()}
            app = self._authenticate_client(request, form)
            grant_type = form.get("grant_type", "")
            if not grant_type:
                raise missing_parameter("grant_type")
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
            return self._platform.answers.error_json(exc)
        self._platform.counters.tokens_issued += 1
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
            raise missing_parameter("client_id")
        app = self._platform.apps.get(client_id)
        if app is None:
            raise OAuthError("unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self._platform.state.tenant_domain}'. This can happen if the application has not been "
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
            raise missing_parameter("code")
        code = self._platform.codes.get(code_value)
        now = self._platform.now()
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
        if self._platform.revoked(code.user_id, app.client_id, code.sid):
            raise self._revoked_error(code.user_id, app.client_id, now)
        return self._issue(app, code.user_id, code.sid, code.scopes, code.scopes.names, nonce=code.nonce,
                           include_client_info=form.get("client_info") == "1")

    def _redeem_refresh_token(self, app: AppRegistration, form: dict[str, str]) -> dict[str, Any]:
        value = form.get("refresh_token", "")
        if not value:
            raise missing_parameter("refresh_token")
        record = self._platform.refresh_tokens.get(value)
        now = self._platform.now()
        if record is None:
            raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if record.client_id != app.client_id:
            raise OAuthError("invalid_grant", 70000,
                             "The provided grant is invalid or malformed: the refresh token was issued to "
                             "another client.")
        if now >= record.expires_at:
            days = self._platform.refresh_token_lifetime_s / 86400
            raise OAuthError("invalid_grant", 700082,
                             f"The refresh token has expired due to inactivity. The token was issued on "
                             f"{_iso(record.issued_at)} and was inactive for {days:g} days.")
        if self._platform.revoked(record.user_id, app.client_id, record.sid):
            raise self._revoked_error(record.user_id, app.client_id, record.issued_at)
        if record.used and self._platform.single_use_refresh_tokens:
            raise OAuthError("invalid_grant", 70000,
                             "The provided grant is invalid or malformed: this refresh token was already "
                             "redeemed (the sandbox runs with single-use refresh tokens).")
        requested = parse_scopes(form.get("scope", ""))
        scopes = Scopes(names=record.scopes, spelled=tuple(s for s in record.scopes if s != "offline_access"))
        if requested:
            scopes = self._platform.check_delegated_scopes(app, requested)
            asked = {graph_permission(s) for s in requested if s not in OIDC_SCOPES}
            missing = [s for s in scopes.names if s in asked and s not in record.scopes]
            if missing:
                raise OAuthError("invalid_grant", 65001,
                                 f"The user or administrator has not consented to use the application with ID "
                                 f"'{app.client_id}' named '{app.display_name}'. Send an interactive "
                                 "authorization request for this user and resource.")
        record.used = True
        self._platform.counters.refreshes += 1
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
            raise missing_parameter("scope")
        if scope.split() != [f"{GRAPH_RESOURCE}/.default"] and scope.split() != [f"{GRAPH_APP_ID}/.default"]:
            raise OAuthError("invalid_scope", 1002012,
                             f"The provided value for scope {scope} is not valid. Client credential flows must "
                             "have a scope value with /.default suffixed to the resource identifier "
                             "(application ID URI).")
        now = self._platform.now()
        lifetime = self._platform.access_token_lifetime_s
        claims = {
            "aud": GRAPH_RESOURCE,
            "iss": f"https://sts.windows.net/{self._platform.state.tenant_id}/",
            "iat": int(now), "nbf": int(now), "exp": int(now + lifetime),
            "app_displayname": app.display_name,
            "appid": app.client_id, "appidacr": "1",
            "idp": f"https://sts.windows.net/{self._platform.state.tenant_id}/",
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app.client_id}")),
            "roles": sorted(app.app_roles),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app.client_id}")),
            "tid": self._platform.state.tenant_id,
            "uti": opaque(16), "ver": "1.0",
        }
        return {"token_type": "Bearer", "expires_in": int(lifetime), "ext_expires_in": int(lifetime),
                "access_token": self._platform.signer.sign(claims)}

    def _revoked_error(self, user_id: str, client_id: str, issued_at: float) -> OAuthError:
        valid_from = self._platform.valid_from.get((user_id, client_id), self._platform.now())
        return OAuthError("invalid_grant", 50173,
                          "The provided grant has expired due to it being revoked, a fresh auth token is "
                          "needed. The user might have changed or reset their password. The grant was issued "
                          f"on '{_iso(issued_at)}' and the TokensValidFrom date (before which tokens are not "
                          f"valid) for this user is '{_iso(valid_from)}'.")

    def _issue(self, app: AppRegistration, user_id: str, sid: str, scopes: Scopes, grant: tuple[str, ...], *,
               nonce: str | None, include_client_info: bool) -> dict[str, Any]:
        """The token response: access token for ``scopes``; a refresh token for the whole ``grant``."""
        user = self._platform.state.users[user_id]
        now = self._platform.now()
        lifetime = self._platform.access_token_lifetime_s
        tenant_id = self._platform.state.tenant_id
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
            "access_token": self._platform.signer.sign(access),
        }
        if "offline_access" in grant:
            refresh = opaque(96)
            self._platform.refresh_tokens[refresh] = RefreshToken(
                client_id=app.client_id, user_id=user_id, sid=sid, scopes=grant, issued_at=now,
                expires_at=now + self._platform.refresh_token_lifetime_s)
            body["refresh_token"] = refresh
        if "openid" in scopes.names:
            id_claims: dict[str, Any] = {
                "aud": app.client_id,
                "iss": f"{self._platform.authority_host}/{tenant_id}/v2.0",
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
            body["id_token"] = self._platform.signer.sign(id_claims)
        if include_client_info:
            body["client_info"] = client_info(user.id, tenant_id)
        return body


def _pairwise_sub(user_id: str, client_id: str) -> str:
    # Entra's id_token "sub" is pairwise per app; derive one stably.
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"{user_id}:{client_id}").bytes
    return base64.urlsafe_b64encode(digest + digest[:8]).rstrip(b"=").decode("ascii")


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%m/%d/%Y %H:%M:%S")
