"""HTTP plumbing shared by every HTTP blueprint: the one place errors become statuses.

A handler is three steps: parse the request (helpers here), call one core
service, map the result. ``handle_errors`` turns any ``MailsyncError`` into
``{"error": {"code", "message"}}`` with its status; anything unexpected is
logged and answered as a bare 500 — never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
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
    UnsupportedMediaType,
)

log = logging.getLogger("mailsync.http")

DEFAULT_MAX_BODY_BYTES = 1_000_000


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    """A JSON response (no caching: these are per-account answers)."""
    all_headers = {"Cache-Control": "no-store"}
    all_headers.update(headers or {})
    return func.HttpResponse(orjson.dumps(body, default=str), status_code=status,
                             mimetype="application/json", headers=all_headers)


def error_response(error: MailsyncError) -> func.HttpResponse:
    headers: dict[str, str] = {}
    if isinstance(error, DependencyUnavailable):
        headers["Retry-After"] = str(max(1, int(error.retry_after_s)))
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = 'Bearer realm="mailsync"'
    return json_response({"error": {"code": error.code, "message": error.message}}, error.http_status, headers)


def handle_errors(handler: Callable[..., func.HttpResponse]) -> Callable[..., func.HttpResponse]:
    """Wrap an HTTP handler so core errors map to their statuses in one place."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> func.HttpResponse:
        try:
            return handler(*args, **kwargs)
        except MailsyncError as error:
            if error.http_status >= 500:
                log.warning("request failed: %s", error.code, extra={"error_code": error.code})
            return error_response(error)
        except Exception:
            log.exception("unhandled error in HTTP handler")
            return json_response({"error": {"code": "internal_error", "message": "internal error"}}, 500)

    return wrapper


def read_json(req: func.HttpRequest, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES, required: bool = True) -> Any:
    """The request body as JSON, or a clear 400 / 413 / 415."""
    body = req.get_body() or b""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is over {max_bytes} bytes")
    if not body:
        if required:
            raise InputError("request body is required")
        return None
    content_type = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"expected application/json, got {content_type}")
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
