"""The real MSAL for Python against the sandbox, through mailsync's sandbox routing.

MSAL keeps the real authority (https://login.microsoftonline.com/...) and
talks through ``SandboxRoutingSession``; the browser part (sign-in form) is
driven over HTTP at the URL ``browser_authorize_url`` gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msal
import pytest
import requests

from graph_sandbox.config import SandboxConfig
from graph_sandbox.server import SandboxServer
from mailsync.auth.sandbox_routing import (
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SandboxRoutingSession,
    browser_authorize_url,
    route_to_sandbox,
)
from mailsync.errors import ConfigurationError

REDIRECT = "http://127.0.0.1:7071/api/oauth/callback"
SCOPES = ["Mail.ReadWrite", "User.Read"]


class RecordingSession(SandboxRoutingSession):
    """Remembers every URL MSAL asked for and where it really went."""

    def __init__(self, sandbox_url: str) -> None:
        super().__init__(sandbox_url)
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().request(method, url, *args, **kwargs)
        self.calls.append((url.decode() if isinstance(url, bytes) else url, response.url))
        return response


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    sandbox = SandboxServer(SandboxConfig(users=2, messages_per_user=3))
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def http(server: SandboxServer) -> Iterator[RecordingSession]:
    session = RecordingSession(server.base_url)
    yield session
    session.close()


def make_app(http: SandboxRoutingSession, tenant: str = "common",
             cache: msal.SerializableTokenCache | None = None) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        SANDBOX_CLIENT_ID, client_credential=SANDBOX_CLIENT_SECRET,
        authority=f"https://login.microsoftonline.com/{tenant}", http_client=http, token_cache=cache)


def users(server: SandboxServer) -> list[Any]:
    return sorted(server.state.users.values(), key=lambda u: u.mail)


def browser_sign_in(server: SandboxServer, flow: dict[str, Any], username: str | None,
                    *, cancel: bool = False) -> dict[str, str]:
    """What a person does in the browser: open the page, pick an account (or Cancel)."""
    url = browser_authorize_url(flow["auth_uri"], server.base_url)
    page = requests.get(url, timeout=10)
    assert page.status_code == 200
    form = {"cancel": "1"} if cancel else {"username": username or ""}
    response = requests.post(url, data=form, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text[:300]
    location = response.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return dict(parse_qsl(urlsplit(location).query))


def start_flow(app: msal.ConfidentialClientApplication) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MSAL suggests form_post; query is what the product uses
        return app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT)


def test_msal_completes_the_auth_code_flow_then_refreshes_and_reaches_me(
        server: SandboxServer, http: RecordingSession) -> None:
    cache = msal.SerializableTokenCache()
    app = make_app(http, cache=cache)
    flow = start_flow(app)
    assert flow["auth_uri"].startswith("https://login.microsoftonline.com/common/oauth2/v2.0/authorize?")
    user = users(server)[0]

    result = app.acquire_token_by_auth_code_flow(flow, browser_sign_in(server, flow, user.mail))

    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == user.user_principal_name
    assert cache.has_state_changed
    me = http.get("https://graph.microsoft.com/v1.0/me",
                  headers={"Authorization": f"Bearer {result['access_token']}"}, timeout=10)
    assert me.status_code == 200 and me.json()["id"] == user.id

    accounts = app.get_accounts()
    assert [a["username"] for a in accounts] == [user.user_principal_name]
    assert accounts[0]["home_account_id"] == f"{user.id}.{server.state.tenant_id}"
    old_refresh = next(cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))["secret"]

    refreshed = app.acquire_token_silent_with_error(SCOPES, account=accounts[0], force_refresh=True)
    assert refreshed is not None and "access_token" in refreshed, refreshed
    assert refreshed["access_token"] != result["access_token"]
    new_refresh = next(cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))["secret"]
    assert new_refresh != old_refresh  # rotated, and MSAL kept the new one
    me = http.get("https://graph.microsoft.com/v1.0/me",
                  headers={"Authorization": f"Bearer {refreshed['access_token']}"}, timeout=10)
    assert me.status_code == 200

    by_refresh_token = app.acquire_token_by_refresh_token(new_refresh, SCOPES)
    assert "access_token" in by_refresh_token, by_refresh_token

    # MSAL asked for Microsoft's hosts; every call went to the sandbox.
    sandbox_host = urlsplit(server.base_url).netloc
    assert all(urlsplit(real).netloc == sandbox_host for _, real in http.calls)
    assert {urlsplit(original).netloc for original, _ in http.calls} == {"login.microsoftonline.com",
                                                                       "graph.microsoft.com"}
    asked = {urlsplit(original).path for original, _ in http.calls}
    assert "/common/v2.0/.well-known/openid-configuration" in asked
    assert "/common/oauth2/v2.0/token" in asked


def test_msal_rejects_a_tampered_state(server: SandboxServer, http: RecordingSession) -> None:
    app = make_app(http)
    flow = start_flow(app)
    answer = browser_sign_in(server, flow, users(server)[0].mail)
    with pytest.raises(ValueError, match="state"):
        app.acquire_token_by_auth_code_flow(flow, {**answer, "state": "forged"})


def test_cancel_comes_back_to_msal_as_access_denied(server: SandboxServer, http: RecordingSession) -> None:
    app = make_app(http)
    flow = start_flow(app)
    result = app.acquire_token_by_auth_code_flow(flow, browser_sign_in(server, flow, None, cancel=True))
    assert result["error"] == "access_denied"


def test_replayed_code_is_refused_to_msal(server: SandboxServer, http: RecordingSession) -> None:
    app = make_app(http)
    flow = start_flow(app)
    answer = browser_sign_in(server, flow, users(server)[0].mail)
    assert "access_token" in app.acquire_token_by_auth_code_flow(dict(flow), answer)
    replay = app.acquire_token_by_auth_code_flow(dict(flow), answer)
    assert replay["error"] == "invalid_grant" and "AADSTS54005" in replay["error_description"]


def test_revoked_grant_surfaces_as_invalid_grant_in_msal(server: SandboxServer, http: RecordingSession) -> None:
    app = make_app(http)
    flow = start_flow(app)
    user = users(server)[1]
    assert "access_token" in app.acquire_token_by_auth_code_flow(flow, browser_sign_in(server, flow, user.mail))
    revoke = requests.post(f"{server.base_url}/sandbox/users/{user.id}/revoke-grant",
                           json={"app_id": SANDBOX_CLIENT_ID}, timeout=10)
    assert revoke.status_code == 200
    try:
        result = app.acquire_token_silent_with_error(SCOPES, account=app.get_accounts()[0], force_refresh=True)
        assert result is not None and result["error"] == "invalid_grant", result
        assert "AADSTS50173" in result["error_description"]
    finally:
        requests.post(f"{server.base_url}/sandbox/users/{user.id}/restore-grant",
                      json={"app_id": SANDBOX_CLIENT_ID}, timeout=10)


def test_msal_client_credentials_through_the_routing_session(server: SandboxServer, http: RecordingSession) -> None:
    app = make_app(http, tenant=server.state.tenant_id)
    result = app.acquire_token_for_client(["https://graph.microsoft.com/.default"])
    assert "access_token" in result, result
    user = users(server)[0]
    response = http.get(f"https://graph.microsoft.com/v1.0/users/{user.id}/mailFolders/inbox",
                        headers={"Authorization": f"Bearer {result['access_token']}"}, timeout=10)
    assert response.status_code == 200, response.text


# -- the routing functions themselves ----------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("https://login.microsoftonline.com/common/oauth2/v2.0/token",
     "http://127.0.0.1:7081/common/oauth2/v2.0/token"),
    ("https://graph.microsoft.com/v1.0/me/messages?$top=5", "http://127.0.0.1:7081/v1.0/me/messages?$top=5"),
    ("https://LOGIN.microsoftonline.com/x", "http://127.0.0.1:7081/x"),
    ("http://127.0.0.1:7081/v1.0/me/mailFolders/inbox/messages/delta?$skiptoken=a",
     "http://127.0.0.1:7081/v1.0/me/mailFolders/inbox/messages/delta?$skiptoken=a"),
    ("https://example.com/other", "https://example.com/other"),
    ("http://graph.microsoft.com/v1.0/me", "http://graph.microsoft.com/v1.0/me"),  # only https is Microsoft's
])
def test_route_to_sandbox(url: str, expected: str) -> None:
    assert route_to_sandbox(url, "http://127.0.0.1:7081") == expected


def test_route_to_sandbox_keeps_a_path_prefix() -> None:
    assert (route_to_sandbox("https://graph.microsoft.com/v1.0/me", "https://demo.example/sandbox/")
            == "https://demo.example/sandbox/v1.0/me")


def test_browser_authorize_url_only_rewrites_microsoft_sign_in_urls() -> None:
    url = "https://login.microsoftonline.com/common/oauth2/v2.0/authorize?client_id=a&state=b"
    assert (browser_authorize_url(url, "http://127.0.0.1:7081")
            == "http://127.0.0.1:7081/common/oauth2/v2.0/authorize?client_id=a&state=b")
    for bad in ("https://graph.microsoft.com/v1.0/me", "https://evil.example/common/oauth2/v2.0/authorize",
                "http://login.microsoftonline.com/common/oauth2/v2.0/authorize"):
        with pytest.raises(ValueError):
            browser_authorize_url(bad, "http://127.0.0.1:7081")


@pytest.mark.parametrize("bad", ["", "127.0.0.1:7081", "ftp://host", "http://host/?q=1"])
def test_routing_session_refuses_a_bad_sandbox_url(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        SandboxRoutingSession(bad)
