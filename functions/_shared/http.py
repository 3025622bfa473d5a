"""HTTP plumbing shared by every HTTP blueprint: the one place errors become statuses.

A handler is three steps: parse the request (helpers here), call one core
service, map the result. ``handle_errors`` turns any ``MailsyncError`` into
``{"error": {"code", "message"}}`` with its status; a 5xx (expected or not)
says only a fixed sentence and a correlation id, its details go to the log.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import azure.functions as func
import orjson

from mailsync.errors import (
    AuthenticationError,
    DependencyUnavailable,
    InputError,
    MailsyncError,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
)

log = logging.getLogger("mailsync.http")

DEFAULT_MAX_BODY_BYTES = 1_000_000


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    """A JSON response (no caching: these are per-account answers; never sniffed as anything else)."""
    all_headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    all_headers.update(headers or {})
    return func.HttpResponse(orjson.dumps(body, default=str), status_code=status,
                             mimetype="application/json", headers=all_headers)


# What a 5xx says: its code and one of these, never the error's own message (a store's query, a
# table's reason, a server's words), which goes to the log under the correlation id the body carries.
_SERVER_MESSAGES = {
    503: "A service mailsync depends on is unavailable. Try again in a moment.",
    502: "The mail provider failed. Try again later.",
}
_INTERNAL_MESSAGE = "Internal error."


def error_response(error: MailsyncError, correlation_id: str | None = None) -> func.HttpResponse:
    """The JSON error body for ``error``: its message for a 4xx, a fixed sentence and the correlation id for a 5xx."""
    headers: dict[str, str] = {}
    retry_after = getattr(error, "retry_after_s", None)
    if isinstance(error, DependencyUnavailable | RateLimited) or (error.http_status == 503 and retry_after):
        # Rounded up: a client that waits exactly this long is not refused again.
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 5)))
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = 'Bearer realm="mailsync"'
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.http_status >= 500:
        body = {"code": error.code, "message": _SERVER_MESSAGES.get(error.http_status, _INTERNAL_MESSAGE),
                "correlation_id": correlation_id or new_correlation_id()}
    return json_response({"error": body}, error.http_status, headers)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def handle_errors(handler: Callable[..., func.HttpResponse]) -> Callable[..., func.HttpResponse]:
    """Wrap an HTTP handler so core errors map to their statuses in one place.

    A 4xx tells the caller what was wrong with the request. Anything else —
    a MailsyncError answering 5xx, or an exception nobody expected — is
    logged in full with a fresh correlation id, and the response carries
    only that id (no message from inside, no stack trace).
    """

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> func.HttpResponse:
        try:
            return handler(*args, **kwargs)
        except MailsyncError as error:
            if error.http_status < 500:
                return error_response(error)
            correlation_id = new_correlation_id()
            log.warning("request failed: %s: %s", error.code, error.message,
                        extra={"error_code": error.code, "correlation_id": correlation_id})
            return error_response(error, correlation_id)
        except Exception:
            correlation_id = new_correlation_id()
            log.exception("unhandled error in HTTP handler", extra={"correlation_id": correlation_id})
            return json_response({"error": {"code": "internal_error", "message": _INTERNAL_MESSAGE,
                                            "correlation_id": correlation_id}}, 500)

    return wrapper


def read_json(req: func.HttpRequest, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES, required: bool = True) -> Any:
    """The request body as JSON (``Content-Type: application/json`` required), or a clear 400 / 413 / 415."""
    body = req.get_body() or b""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is over {max_bytes} bytes")
    if not body:
        if required:
            raise InputError("request body is required")
        return None
    # Required, not merely checked when present: a cross-site form or a no-cors fetch can send a body
    # as text/plain (or with no type) without a CORS preflight; application/json always needs one,
    # so another site cannot make a visitor's browser create accounts or fire IMAP probes.
    content_type = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"expected Content-Type: application/json, got {content_type or 'none'}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"request body is not valid JSON: {exc.msg}") from exc


def read_json_object(req: func.HttpRequest, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> dict[str, Any]:
    body = read_json(req, max_bytes=max_bytes)
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object")
    return body


# Azure Static Web Apps replaces the Authorization header on calls it proxies
# to a linked Function App (Azure/static-web-apps#34, by design), so the page
# sends its token in this header; API clients may keep using Authorization.
PAGE_TOKEN_HEADER = "x-mailsync-authorization"


def bearer_token(req: func.HttpRequest) -> str:
    """The bearer secret of ``X-Mailsync-Authorization`` or ``Authorization: Bearer <token>``, or 401."""
    header = req.headers.get(PAGE_TOKEN_HEADER) or req.headers.get("authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing bearer token")
    return token.strip()


async def on_own_threads(pool: ThreadPoolExecutor, handler: Callable[[func.HttpRequest], func.HttpResponse],
                         req: func.HttpRequest) -> func.HttpResponse:
    """Run a blocking ``handler`` on ``pool`` from an ``async`` function.

    The host runs synchronous functions on one shared thread pool; a
    function whose requests can wait on something slow (Graph's webhook must
    answer in 3 s; a login check waits on a server the caller chose) runs
    its work on threads of its own, so it neither waits behind nor blocks
    the other functions.
    """
    context = contextvars.copy_context()  # keeps the invocation's log context
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(context.run, handler, req))
