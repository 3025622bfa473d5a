"""The sandbox identity platform over HTTP: authorize, token, and Graph's 401."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from graph_sandbox.app_registrations import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET
from graph_sandbox.config import SandboxConfig
from graph_sandbox.server import SandboxServer
from graph_sandbox.tokens import TokenSigner, unverified_claims
from mailsync.auth.sandbox_routing import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from tests.graph_sandbox.signin import (
    REDIRECT,
    SCOPE,
    auth_params,
    authorize_url,
    pkce,
    redirected,
    sign_in,
    token,
    user_tokens,
)


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    sandbox = SandboxServer(SandboxConfig(users=2, messages_per_user=2, access_token_lifetime_s=600))
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def url(server: SandboxServer) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def user(server: SandboxServer) -> Any:
    return sorted(server.state.users.values(), key=lambda u: u.mail)[0]


def advance_clock(url: str, seconds: float) -> None:
    response = requests.post(f"{url}/sandbox/clock", json={"advance_s": seconds}, timeout=10)
    assert response.status_code == 200, response.text


def aad_error(response: requests.Response, status: int, error: str, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert body["error_codes"] == [code], body
    assert body["error_description"].startswith(f"AADSTS{code}:"), body
    assert {"timestamp", "trace_id", "correlation_id"} <= body.keys()
    return body


def me(url: str, access_token: str | None) -> requests.Response:
    headers = {} if access_token is None else {"Authorization": f"Bearer {access_token}"}
    return requests.get(f"{url}/v1.0/me", headers=headers, timeout=10)


def graph_401(response: requests.Response, message_part: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "InvalidAuthenticationToken"
    assert message_part in error["message"]
    assert {"date", "request-id", "client-request-id"} <= error["innerError"].keys()
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")


# -- discovery -------------------------------------------------------------------


def test_demo_app_matches_the_products_sandbox_constants() -> None:
    assert (DEMO_CLIENT_ID, DEMO_CLIENT_SECRET) == (SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET)


@pytest.mark.parametrize("tenant", ["common", "organizations", "tenant-id", "tenant-domain"])
def test_openid_configuration_names_the_real_authority(server: SandboxServer, url: str, tenant: str) -> None:
    segment = {"tenant-id": server.state.tenant_id, "tenant-domain": server.state.tenant_domain}.get(tenant, tenant)
    doc = requests.get(f"{url}/{segment}/v2.0/.well-known/openid-configuration", timeout=10).json()
    base = f"https://login.microsoftonline.com/{segment}"
    assert doc["authorization_endpoint"] == f"{base}/oauth2/v2.0/authorize"
    assert doc["token_endpoint"] == f"{base}/oauth2/v2.0/token"
    assert doc["jwks_uri"] == f"{base}/discovery/v2.0/keys"
    issuer_tenant = "{tenantid}" if tenant in ("common", "organizations") else server.state.tenant_id
    assert doc["issuer"] == f"https://login.microsoftonline.com/{issuer_tenant}/v2.0"


def test_unknown_tenant_is_refused(url: str) -> None:
    response = requests.get(f"{url}/no-such-tenant/v2.0/.well-known/openid-configuration", timeout=10)
    aad_error(response, 400, "invalid_tenant", 90002)


def test_jwks_verifies_issued_tokens(url: str, user: Any) -> None:
    tokens, _ = user_tokens(url, user.mail)
    keys = requests.get(f"{url}/common/discovery/v2.0/keys", timeout=10).json()["keys"]
    header = json.loads(base64.urlsafe_b64decode(tokens["access_token"].split(".")[0] + "=="))
    assert header["alg"] == "RS256" and header["kid"] in {k["kid"] for k in keys}


def test_instance_discovery_answers_msal(url: str) -> None:
    body = requests.get(f"{url}/common/discovery/instance",
                        params={"api-version": "1.1", "authorization_endpoint":
                                "https://login.microsoftonline.com/common/oauth2/authorize"}, timeout=10).json()
    aliases = body["metadata"][0]["aliases"]
    assert "login.microsoftonline.com" in aliases


# -- authorize: the sign-in page and its validation --------------------------------


def test_sign_in_page_lists_every_sandbox_user(server: SandboxServer, url: str) -> None:
    _, challenge = pkce()
    page = requests.get(authorize_url(url, auth_params(challenge)), timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    for u in server.state.users.values():
        assert u.mail in page.text
    assert 'name="cancel"' in page.text.replace("'", '"')


@pytest.mark.parametrize(("override", "code"), [
    ({"client_id": None}, 900144),
    ({"client_id": str(uuid.uuid4())}, 700016),
    ({"redirect_uri": None}, 900144),
    ({"redirect_uri": "https://evil.example/api/oauth/callback"}, 50011),
    ({"redirect_uri": "http://127.0.0.1:7071/api/other"}, 50011),
    ({"redirect_uri": "https://127.0.0.1:7071/api/oauth/callback"}, 50011),
    ({"redirect_uri": "http://127.0.0.2:7071/api/oauth/callback"}, 50011),
])
def test_bad_client_or_redirect_uri_shows_an_error_page_and_never_redirects(
        url: str, override: dict[str, str | None], code: int) -> None:
    _, challenge = pkce()
    response = requests.get(authorize_url(url, auth_params(challenge, **override)), allow_redirects=False,
                            timeout=10)
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert f"AADSTS{code}" in response.text


@pytest.mark.parametrize("redirect_uri", [
    "http://127.0.0.1:7071/api/oauth/callback",
    "http://127.0.0.1:51234/api/oauth/callback",
    "http://localhost:8080/api/oauth/callback",
])
def test_loopback_redirect_uris_match_on_any_port(url: str, user: Any, redirect_uri: str) -> None:
    _, challenge = pkce()
    params = auth_params(challenge, redirect_uri=redirect_uri)
    response = requests.post(authorize_url(url, params), data={"username": user.mail}, allow_redirects=False,
                             timeout=10)
    assert response.status_code == 302
    assert response.headers["Location"].startswith(redirect_uri + "?code=")


@pytest.mark.parametrize(("override", "error", "code"), [
    ({"response_type": None}, "invalid_request", 900144),
    ({"response_type": "token"}, "unsupported_response_type", 700051),
    ({"response_type": "id_token"}, "unsupported_response_type", 700054),
    ({"scope": None}, "invalid_request", 900144),
    ({"scope": "Mail.ReadWrite Calendars.Nope"}, "invalid_scope", 70011),
    ({"code_challenge": None, "code_challenge_method": None}, "invalid_request", 9002325),
    ({"code_challenge_method": "S512"}, "invalid_request", 50149),
    ({"code_challenge": "short"}, "invalid_request", 501491),
    ({"prompt": "none"}, "login_required", 50058),
])
def test_bad_requests_are_redirected_back_with_the_error_and_state(
        url: str, override: dict[str, str | None], error: str, code: int) -> None:
    _, challenge = pkce()
    params = auth_params(challenge, **override)
    answer = redirected(requests.get(authorize_url(url, params), allow_redirects=False, timeout=10))
    assert answer["error"] == error
    assert answer["error_description"].startswith(f"AADSTS{code}:")
    assert answer["state"] == params["state"]
    assert "code" not in answer


def test_cancel_redirects_with_access_denied(url: str) -> None:
    _, challenge = pkce()
    params = auth_params(challenge)
    answer = redirected(requests.post(authorize_url(url, params), data={"cancel": "1"}, allow_redirects=False,
                                      timeout=10))
    assert answer["error"] == "access_denied"
    assert answer["state"] == params["state"]
    assert "code" not in answer


def test_unknown_username_stays_on_the_page(url: str) -> None:
    _, challenge = pkce()
    response = requests.post(authorize_url(url, auth_params(challenge)), data={"username": "nobody@example.com"},
                             allow_redirects=False, timeout=10)
    assert response.status_code == 200
    assert "AADSTS50034" in response.text


def test_form_post_response_mode_posts_the_code(url: str, user: Any) -> None:
    _, challenge = pkce()
    params = auth_params(challenge, response_mode="form_post")
    response = requests.post(authorize_url(url, params), data={"username": user.mail}, allow_redirects=False,
                             timeout=10)
    assert response.status_code == 200
    assert f"action='{REDIRECT}'" in response.text
    assert "name='code'" in response.text and f"value='{params['state']}'" in response.text


# -- token: authorization_code -------------------------------------------------------


def test_code_redemption_gives_tokens_msal_can_use(server: SandboxServer, url: str, user: Any) -> None:
    tokens, params = user_tokens(url, user.mail)
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 600
    assert set(tokens["scope"].split()) >= {"Mail.ReadWrite", "User.Read", "openid", "profile"}
    assert "offline_access" not in tokens["scope"].split()
    id_claims = unverified_claims(tokens["id_token"])
    assert id_claims["nonce"] == params["nonce"]
    assert id_claims["aud"] == DEMO_CLIENT_ID
    assert id_claims["tid"] == server.state.tenant_id
    assert id_claims["preferred_username"] == user.user_principal_name
    info = json.loads(base64.urlsafe_b64decode(tokens["client_info"] + "=="))
    assert info == {"uid": user.id, "utid": server.state.tenant_id}
    access = unverified_claims(tokens["access_token"])
    assert access["aud"] == "https://graph.microsoft.com"
    assert access["oid"] == user.id and access["appid"] == DEMO_CLIENT_ID
    assert access["exp"] - access["iat"] == 600
    assert {"Mail.ReadWrite", "User.Read"} <= set(access["scp"].split())
    assert me(url, tokens["access_token"]).json()["id"] == user.id


def test_authorization_code_is_single_use(url: str, user: Any) -> None:
    verifier, challenge = pkce()
    params = auth_params(challenge)
    code = sign_in(url, params, user.mail)["code"]
    grant = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    assert token(url, grant).status_code == 200
    aad_error(token(url, grant), 400, "invalid_grant", 54005)


def test_authorization_code_expires(url: str, user: Any) -> None:
    verifier, challenge = pkce()
    code = sign_in(url, auth_params(challenge), user.mail)["code"]
    advance_clock(url, 601)
    grant = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    aad_error(token(url, grant), 400, "invalid_grant", 70008)


@pytest.mark.parametrize("verifier", ["", "wrong-" + "v" * 50])
def test_pkce_verifier_must_match(url: str, user: Any, verifier: str) -> None:
    _, challenge = pkce()
    code = sign_in(url, auth_params(challenge), user.mail)["code"]
    grant = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    if verifier:
        grant["code_verifier"] = verifier
    aad_error(token(url, grant), 400, "invalid_grant", 501481)


def test_redirect_uri_must_match_the_authorize_request(url: str, user: Any) -> None:
    verifier, challenge = pkce()
    code = sign_in(url, auth_params(challenge), user.mail)["code"]
    grant = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
             "redirect_uri": "http://127.0.0.1:9999/api/oauth/callback"}
    aad_error(token(url, grant), 400, "invalid_grant", 50011)


@pytest.mark.parametrize(("data", "status", "error", "code"), [
    ({"client_secret": "wrong"}, 401, "invalid_client", 7000215),
    ({"client_secret": ""}, 401, "invalid_client", 7000218),
    ({"client_id": str(uuid.uuid4())}, 400, "unauthorized_client", 700016),
    ({"grant_type": ""}, 400, "invalid_request", 900144),
    ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
    ({"code": "not-a-code"}, 400, "invalid_grant", 9002313),
])
def test_token_endpoint_errors(url: str, data: dict[str, str], status: int, error: str,
                               code: int) -> None:
    grant = {"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT, "code_verifier": "v" * 43}
    aad_error(token(url, {**grant, **data}), status, error, code)


def test_client_secret_in_basic_auth_is_accepted(server: SandboxServer, url: str) -> None:
    response = requests.post(
        f"{url}/{server.state.tenant_id}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "scope": "https://graph.microsoft.com/.default"},
        auth=(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET), timeout=10)
    assert response.status_code == 200, response.text


# -- token: refresh_token ------------------------------------------------------------------


def test_refresh_token_rotates_and_the_old_one_stays_valid_like_entra(url: str, user: Any) -> None:
    tokens, _ = user_tokens(url, user.mail)
    first = token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "scope": SCOPE})
    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert "nonce" not in unverified_claims(rotated["id_token"])
    assert me(url, rotated["access_token"]).status_code == 200
    # Entra does not revoke a refresh token when it is used (two workers racing both succeed).
    again = token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "scope": SCOPE})
    assert again.status_code == 200
    assert again.json()["refresh_token"] not in (tokens["refresh_token"], rotated["refresh_token"])


def test_single_use_refresh_tokens_when_configured(server: SandboxServer, url: str, user: Any) -> None:
    tokens, _ = user_tokens(url, user.mail)
    server.state.apply_runtime(single_use_refresh_tokens=True)
    try:
        grant = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "scope": SCOPE}
        rotated = token(url, grant)
        assert rotated.status_code == 200
        aad_error(token(url, grant), 400, "invalid_grant", 70000)
        newer = token(url, {**grant, "refresh_token": rotated.json()["refresh_token"]})
        assert newer.status_code == 200
    finally:
        server.state.apply_runtime(single_use_refresh_tokens=False)


def test_refresh_cannot_widen_the_grant(url: str, user: Any) -> None:
    tokens, _ = user_tokens(url, user.mail, scope="Mail.Read offline_access openid profile")
    response = token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                               "scope": "Mail.ReadWrite offline_access"})
    aad_error(response, 400, "invalid_grant", 65001)


def test_refresh_token_of_another_client_or_garbage_is_refused(url: str) -> None:
    aad_error(token(url, {"grant_type": "refresh_token", "refresh_token": "garbage"}), 400, "invalid_grant",
              9002313)
    aad_error(token(url, {"grant_type": "refresh_token"}), 400, "invalid_request", 900144)


def test_refresh_token_expires_after_its_lifetime(server: SandboxServer, url: str, user: Any) -> None:
    tokens, _ = user_tokens(url, user.mail)
    server.state.apply_runtime(refresh_token_lifetime_s=60)
    try:
        fresh = token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
        short_lived = fresh.json()["refresh_token"]
        advance_clock(url, 61)
        aad_error(token(url, {"grant_type": "refresh_token", "refresh_token": short_lived}), 400,
                  "invalid_grant", 700082)
    finally:
        server.state.apply_runtime(refresh_token_lifetime_s=90 * 24 * 3600)


# -- client credentials ---------------------------------------------------------------------


def test_client_credentials_gives_an_app_only_token(server: SandboxServer, url: str) -> None:
    response = token(url, {"grant_type": "client_credentials", "scope": "https://graph.microsoft.com/.default"},
                     tenant=server.state.tenant_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "refresh_token" not in body and "id_token" not in body
    claims = unverified_claims(body["access_token"])
    assert claims["idtyp"] == "app" and "scp" not in claims
    assert "Mail.ReadWrite" in claims["roles"]


@pytest.mark.parametrize(("tenant", "scope", "error", "code"), [
    ("common", "https://graph.microsoft.com/.default", "invalid_request", 9001023),
    ("tenant", "Mail.ReadWrite", "invalid_scope", 1002012),
    ("tenant", "", "invalid_request", 900144),
])
def test_client_credentials_errors(server: SandboxServer, url: str, tenant: str, scope: str, error: str,
                                   code: int) -> None:
    segment = server.state.tenant_id if tenant == "tenant" else tenant
    aad_error(token(url, {"grant_type": "client_credentials", "scope": scope}, tenant=segment), 400, error, code)


# -- Graph's side: 401 InvalidAuthenticationToken --------------------------------------------


def test_missing_or_malformed_tokens_get_graphs_401(url: str) -> None:
    graph_401(me(url, None), "Access token is empty.")
    graph_401(me(url, "not-a-jwt"), "IDX14100")
    forged = TokenSigner().sign({"aud": "https://graph.microsoft.com", "exp": 2**40, "oid": "x", "appid": "y"})
    graph_401(me(url, forged), "Signature validation failed")


def test_expired_access_token_gets_401(url: str, user: Any) -> None:
    tokens, _ = user_tokens(url, user.mail)
    assert me(url, tokens["access_token"]).status_code == 200
    advance_clock(url, 601)
    graph_401(me(url, tokens["access_token"]), "Lifetime validation failed, the token is expired.")
    # The refresh token still works and gives a token that is good again.
    refreshed = token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    assert me(url, refreshed.json()["access_token"]).status_code == 200


def test_revoked_grant_refuses_refresh_and_access_tokens_until_the_user_signs_in_again(
        server: SandboxServer, url: str) -> None:
    victim = sorted(server.state.users.values(), key=lambda u: u.mail)[1]
    tokens, _ = user_tokens(url, victim.mail)
    requests.post(f"{url}/sandbox/users/{victim.id}/revoke-grant", json={}, timeout=10).raise_for_status()
    refresh = token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    aad_error(refresh, 400, "invalid_grant", 50173)
    graph_401(me(url, tokens["access_token"]), "TokenIssuedBeforeRevocationTimestamp")
    # Signing in again is consenting again: new tokens work, old ones stay refused.
    fresh, _ = user_tokens(url, victim.mail)
    assert me(url, fresh["access_token"]).status_code == 200
    aad_error(token(url, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}), 400,
              "invalid_grant", 50173)
    graph_401(me(url, tokens["access_token"]), "TokenIssuedBeforeRevocationTimestamp")
    assert token(url, {"grant_type": "refresh_token", "refresh_token": fresh["refresh_token"]}).status_code == 200


def test_sandbox_identity_view_counts_without_leaking_secrets(url: str, user: Any) -> None:
    before = requests.get(f"{url}/sandbox/identity", timeout=10).json()
    user_tokens(url, user.mail)
    after = requests.get(f"{url}/sandbox/identity", timeout=10).json()
    assert after["signIns"] == before["signIns"] + 1
    assert after["tokensIssued"] == before["tokensIssued"] + 1
    assert [a["clientId"] for a in after["apps"]] == [DEMO_CLIENT_ID]
    assert DEMO_CLIENT_SECRET not in json.dumps(after)
