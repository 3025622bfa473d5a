"""Test helper: what a browser does on the sandbox's sign-in page (form POST, read the redirect)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import requests


def submit_sign_in(authorize_url: str, username: str | None, *, cancel: bool = False) -> str:
    """POST the sign-in form at ``authorize_url``; return the Location it redirects to."""
    page = requests.get(authorize_url, timeout=10)
    assert page.status_code == 200, page.text[:300]
    assert "<form" in page.text
    form = {"cancel": "1"} if cancel else {"username": username or ""}
    response = requests.post(authorize_url, data=form, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text[:300]
    return response.headers["Location"]


def query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))
