"""The shared HTTP plumbing of the blueprints: error mapping, body parsing, bearer tokens."""

from __future__ import annotations

import azure.functions as func
import orjson
import pytest

from functions._shared.http import bearer_token, handle_errors, read_json_object
from mailsync.errors import (
    AuthenticationError,
    DependencyUnavailable,
    InputError,
    PayloadTooLarge,
    UnsupportedMediaType,
)


def request(body: bytes = b"", headers: dict[str, str] | None = None) -> func.HttpRequest:
    return func.HttpRequest("POST", "http://127.0.0.1/api/x", headers=headers or {}, body=body)


def test_the_page_header_wins_over_an_authorization_header_a_proxy_replaced() -> None:
    # Static Web Apps puts its own token in Authorization on proxied calls.
    req = request(headers={"Authorization": "Bearer swa-platform-token",
                           "X-Mailsync-Authorization": "Bearer acct.secret"})
    assert bearer_token(req) == "acct.secret"


def test_plain_authorization_still_works_for_api_clients() -> None:
    assert bearer_token(request(headers={"Authorization": "Bearer acct.secret"})) == "acct.secret"


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer   ", "Basic abc", "acct.secret"])
def test_missing_or_malformed_bearer_is_401(header: str) -> None:
    with pytest.raises(AuthenticationError):
        bearer_token(request(headers={"Authorization": header} if header else {}))


def test_body_errors_are_clear() -> None:
    with pytest.raises(InputError, match="not valid JSON"):
        read_json_object(request(b"{nope", {"Content-Type": "application/json"}))
    with pytest.raises(InputError, match="JSON object"):
        read_json_object(request(b"[1]", {"Content-Type": "application/json"}))
    with pytest.raises(UnsupportedMediaType):
        read_json_object(request(b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}))
    with pytest.raises(PayloadTooLarge):
        read_json_object(request(b"{}" + b" " * 100, {"Content-Type": "application/json"}), max_bytes=10)


def test_errors_map_to_json_bodies_and_unexpected_ones_hide_their_details() -> None:
    @handle_errors
    def unavailable(_: func.HttpRequest) -> func.HttpResponse:
        raise DependencyUnavailable("tables are down", retry_after_s=7)

    @handle_errors
    def broken(_: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("secret internals")

    response = unavailable(request())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert orjson.loads(response.get_body()) == {"error": {"code": "dependency_unavailable",
                                                           "message": "tables are down"}}
    response = broken(request())
    assert response.status_code == 500
    assert b"secret internals" not in response.get_body()
