"""Return URLs: only allow-listed origins and paths; everything ambiguous is refused."""

from __future__ import annotations

import pytest

from mailsync.errors import ConfigurationError, InputError
from mailsync.linking.return_urls import ReturnUrlPolicy, with_params

POLICY = ReturnUrlPolicy(["http://127.0.0.1:7071", "https://app.example.com/mail"],
                         "http://127.0.0.1:7071/data.html")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:7071/data.html",
    "http://127.0.0.1:7071/index.html?x=1#top",
    "HTTP://127.0.0.1:7071/",
    "https://app.example.com/mail",
    "https://app.example.com/mail/inbox?id=3",
    "https://APP.example.com:443/mail/",
])
def test_allowed(url: str) -> None:
    assert POLICY.check(url) == url


def test_default_when_absent() -> None:
    assert POLICY.check(None) == "http://127.0.0.1:7071/data.html"
    assert POLICY.check("") == "http://127.0.0.1:7071/data.html"


@pytest.mark.parametrize("url", [
    "https://evil.example.com/data.html",                 # other host
    "http://127.0.0.1:7072/data.html",                    # other port
    "https://127.0.0.1:7071/data.html",                   # other scheme
    "https://app.example.com/mailbox",                    # path prefix is not a path segment
    "https://app.example.com/",                           # outside the allowed path
    "http://127.0.0.1:7071@evil.example.com/",            # user-info trick
    "http://user:pw@127.0.0.1:7071/",                     # user-info
    "//evil.example.com/data.html",                       # protocol-relative
    "/data.html",                                         # relative
    "javascript:alert(1)",
    "data:text/html,hi",
    "http://127.0.0.1:7071\\@evil.example.com/",          # backslash
    "http://127.0.0.1:7071/\r\nLocation: https://evil/",  # header injection
    "http://127.0.0.1:7071/ x",
    "http://127.0.0.1:99999/",                            # bad port
    "http://127.0.0.1:7071/" + "a" * 3000,
])
def test_refused(url: str) -> None:
    with pytest.raises(InputError) as info:
        POLICY.check(url)
    assert info.value.http_status == 400
    assert info.value.code == "invalid_return_url"


def test_non_string_refused() -> None:
    with pytest.raises(InputError):
        POLICY.check(["http://127.0.0.1:7071/"])  # type: ignore[arg-type]


def test_bad_allowlist_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        ReturnUrlPolicy(["not a url"], "http://127.0.0.1:7071/")
    with pytest.raises(ConfigurationError):
        ReturnUrlPolicy([], "http://127.0.0.1:7071/")
    with pytest.raises(InputError):  # the default page must itself be allowed
        ReturnUrlPolicy(["http://127.0.0.1:7071"], "https://elsewhere.example.com/")


def test_with_params_keeps_query_and_fragment_and_encodes() -> None:
    url = with_params("http://h/p?a=1&error=old#frag", {"error": "access denied & more", "account_id": "x"})
    assert url == "http://h/p?a=1&error=access+denied+%26+more&account_id=x#frag"
