"""The sign-in cookie: its attributes, reading it back from Cookie headers, keeping one nonce per browser."""

from __future__ import annotations

from datetime import timedelta

from mailsync.linking.browser_binding import COOKIE_NAME, BrowserBinding

TTL = timedelta(minutes=10)


def test_cookie_attributes_follow_the_public_scheme() -> None:
    plain = BrowserBinding.for_base_url("http://127.0.0.1:7071", TTL).set_cookie("n" * 43)
    assert plain == f"{COOKIE_NAME}={'n' * 43}; Path=/; Max-Age=600; HttpOnly; SameSite=Lax"
    served = BrowserBinding.for_base_url("HTTPS://mail.example.com", TTL).set_cookie("n" * 43)
    assert served.endswith("; HttpOnly; SameSite=Lax; Secure")


def test_the_nonce_is_found_among_other_cookies_and_only_when_well_formed() -> None:
    nonce = BrowserBinding.issue(None)
    assert len(nonce) == 43
    assert BrowserBinding.nonce_from(f"a=1; {COOKIE_NAME}={nonce}; b=2") == nonce
    assert BrowserBinding.nonce_from(f"a=1, {COOKIE_NAME}={nonce}") == nonce   # headers merged by a proxy
    for header in (None, "", "a=1", f"{COOKIE_NAME}=", f"{COOKIE_NAME}=short", f"{COOKIE_NAME}={nonce}x",
                   f"x{COOKIE_NAME}={nonce}", f"{COOKIE_NAME}={nonce[:-1]}!"):
        assert BrowserBinding.nonce_from(header) is None, header


def test_a_browser_keeps_its_nonce_and_only_its_nonce_matches() -> None:
    nonce = BrowserBinding.issue(None)
    assert BrowserBinding.issue(nonce) == nonce
    assert BrowserBinding.issue("not a nonce") != "not a nonce"
    assert BrowserBinding.issue(None) != nonce
    digest = BrowserBinding.digest(nonce)
    assert nonce not in digest and digest == BrowserBinding.digest(nonce) != BrowserBinding.digest(nonce + "x")
