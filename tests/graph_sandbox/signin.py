"""Helpers for tests that need tokens from the sandbox identity platform (over HTTP)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests

from graph_sandbox.app_registrations import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET

REDIRECT = "http://127.0.0.1:7071/api/oauth/callback"
SCOPE = "Mail.ReadWrite User.Read offline_access openid profile"
GRAPH_DEFAULT = "https://graph.microsoft.com/.default"


def pkce() -> tuple[str, str]:
    """A PKCE (verifier, S256 challenge) pair."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def auth_params(challenge: str, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": DEMO_CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT, "scope": SCOPE,
        "state": "st-" + secrets.token_hex(4), "nonce": "n-" + secrets.token_hex(8),
        "code_challenge": challenge, "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def authorize_url(base_url: str, params: dict[str, str], tenant: str = "common") -> str:
    return f"{base_url}/{tenant}/oauth2/v2.0/authorize?{urlencode(params)}"


def redirected(response: requests.Response) -> dict[str, str]:
    """The query of a 302 back to the app's redirect URI."""
    assert response.status_code == 302, response.text[:500]
    return dict(parse_qsl(urlsplit(response.headers["Location"]).query))


def sign_in(base_url: str, params: dict[str, str], username: str) -> dict[str, str]:
    return redirected(requests.post(authorize_url(base_url, params), data={"username": username},
                                    allow_redirects=False, timeout=10))


def token(base_url: str, data: dict[str, str], tenant: str = "common") -> requests.Response:
    body = {"client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET, "client_info": "1", **data}
    return requests.post(f"{base_url}/{tenant}/oauth2/v2.0/token", data=body, timeout=10)


def user_tokens(base_url: str, username: str, **overrides: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Sign ``username`` in through the form and redeem the code: (token response, authorize params)."""
    verifier, challenge = pkce()
    params = auth_params(challenge, **overrides)
    answer = sign_in(base_url, params, username)
    response = token(base_url, {"grant_type": "authorization_code", "code": answer["code"],
                                "redirect_uri": params["redirect_uri"], "code_verifier": verifier,
                                "scope": params.get("scope", SCOPE)})
    assert response.status_code == 200, response.text
    return response.json(), params


def app_token(base_url: str, tenant_id: str) -> str:
    """An app-only (client credentials) access token for Graph."""
    response = token(base_url, {"grant_type": "client_credentials", "scope": GRAPH_DEFAULT}, tenant=tenant_id)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])
