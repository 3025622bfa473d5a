"""The shared HTTP plumbing of the blueprints: error mapping, body parsing, bearer tokens."""

from __future__ import annotations

import logging
import re

import azure.functions as func
import orjson
import pytest

from functions._shared.http import bearer_token, handle_errors, read_json_object
from mailsync.errors import (
    AuthenticationError,
    DependencyUnavailable,
    InputError,
    PayloadTooLarge,
    StoreError,
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


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"}, {"Content-Type": "text/plain; charset=utf-8"},
                                     {"Content-Type": "multipart/form-data; boundary=x"}])
def test_a_json_body_needs_a_json_content_type(headers: dict[str, str]) -> None:
    # What a cross-site form or a no-cors fetch can send without a CORS preflight.
    with pytest.raises(UnsupportedMediaType) as refused:
        read_json_object(request(b'{"provider": "imap"}', headers))
    assert refused.value.http_status == 415
    for accepted in ("application/json", "application/json; charset=utf-8", "application/merge-patch+json"):
        assert read_json_object(request(b"{}", {"Content-Type": accepted})) == {}


def test_errors_map_to_json_bodies_and_unexpected_ones_hide_their_details() -> None:
    @handle_errors
    def unavailable(_: func.HttpRequest) -> func.HttpResponse:
        raise DependencyUnavailable("tables are down", retry_after_s=7)

    @handle_errors
    def broken(_: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("secret internals")

    @handle_errors
    def store_failed(_: func.HttpRequest) -> func.HttpResponse:
        raise StoreError('list_messages: 400 parse_exception {"query": {"bool": {"filter": [...]}}}')

    @handle_errors
    def bad_input(_: func.HttpRequest) -> func.HttpResponse:
        raise InputError("cursor is not a page cursor of this list", code="invalid_cursor")

    response = unavailable(request())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    error = orjson.loads(response.get_body())["error"]
    assert error["code"] == "dependency_unavailable" and "tables are down" not in error["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", error["correlation_id"])
    for handler, leaked in ((broken, b"secret internals"), (store_failed, b"parse_exception")):
        response = handler(request())
        assert response.status_code == 500
        assert leaked not in response.get_body() and b"query" not in response.get_body()
        body = orjson.loads(response.get_body())["error"]
        assert set(body) == {"code", "message", "correlation_id"} and body["correlation_id"] != error["correlation_id"]
    # A 4xx says what was wrong with the request.
    response = bad_input(request())
    assert response.status_code == 400
    assert orjson.loads(response.get_body()) == {"error": {"code": "invalid_cursor",
                                                           "message": "cursor is not a page cursor of this list"}}


def test_the_correlation_id_is_in_the_log_with_the_details(caplog: pytest.LogCaptureFixture) -> None:
    @handle_errors
    def store_failed(_: func.HttpRequest) -> func.HttpResponse:
        raise StoreError("list_messages: 400 search_phase_execution_exception")

    with caplog.at_level(logging.WARNING, logger="mailsync.http"):
        response = store_failed(request())
    correlation_id = orjson.loads(response.get_body())["error"]["correlation_id"]
    logged = [r for r in caplog.records if getattr(r, "correlation_id", None) == correlation_id]
    assert logged and "search_phase_execution_exception" in logged[0].getMessage()
