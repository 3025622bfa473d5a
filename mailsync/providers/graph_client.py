"""The one HTTP seam to Microsoft Graph (or the local Graph sandbox).

Requests travel through ``graph_transport`` (our keep-alive connections;
``requests`` only when a proxy is configured, and in ``mailsync.auth``).
This module turns Graph's HTTP answers into the project's errors so nothing
above it ever looks at a status code:

====================  =============================================
Graph answers          we raise
====================  =============================================
401                    refresh the token once, retry; then ProviderAuthError
429, 503, 504          ProviderThrottled / ProviderUnavailable (Retry-After)
410, or 4xx with an     CursorExpired: the caller resyncs the folder
expired-state code
other 4xx / 5xx        ProviderError / ProviderUnavailable with Graph's code
bad JSON, cut body     MalformedResponse: nothing from the page is applied
connection errors      ProviderUnavailable
====================  =============================================

It never sleeps on a long Retry-After: waiting is the caller's decision
(the sync worker re-enqueues with a visibility delay instead).
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from mailsync.errors import (
    CursorExpired,
    MailsyncError,
    MalformedResponse,
    NotFound,
    PayloadTooLarge,
    ProviderAuthError,
    ProviderError,
    ProviderThrottled,
    ProviderUnavailable,
)
from mailsync.providers.graph_transport import (
    BodyTooLarge,
    GraphResponse,
    GraphTransport,
    KeepAliveTransport,
    RequestsTransport,
    TransportFailed,
)
from mailsync.settings import Settings

# The shared HTTP transport type (one per process and purpose), named here for the modules that hold one.
GraphSession = GraphTransport

GRAPH_URL = "https://graph.microsoft.com/v1.0"
DEFAULT_TIMEOUT_S = 30.0
MAX_RETRY_AFTER_S = 3600.0
BATCH_MAX = 20                 # requests in one JSON batch (Graph's limit)

# Returns an access token; True asks for a forced refresh (after a 401).
TokenSource = Callable[[bool], str]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Returns None when absent or unreadable; never negative; capped at an hour
    so a broken header cannot park a folder forever.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def backoff_delay(attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0,
                  rng: random.Random | None = None) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap_s, base_s * (2 ** max(0, min(attempt, 30))))
    return (rng or random).uniform(0.0, ceiling)


# Graph's codes for "this delta/sync state is gone, start over", matched by code
# whatever the status: Microsoft only promises "a 40X-series error with error
# codes such as syncStateNotFound" (410 for Outlook in microsoft-graph-docs
# #2350; 400 for directory objects), and Corso resyncs on exactly these three.
# Compared case-insensitively: the docs write syncStateNotFound, Outlook sends
# SyncStateNotFound.
EXPIRED_STATE_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})


def is_expired_state(status: int, code: str) -> bool:
    """Does this error answer mean the delta link is gone (resync), rather than a bad request?"""
    return status == 410 or (400 <= status < 500 and status not in (401, 429) and code.lower() in EXPIRED_STATE_CODES)


def graph_error_code(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return str(error["code"])
    return ""


class GraphClient:
    """A pooled, authenticated Graph session for one account (or the app).

    ``base_url`` is Graph's v1.0 root or the sandbox's; absolute
    ``@odata.nextLink``/``deltaLink`` URLs are followed as given.
    """

    def __init__(self, token_source: TokenSource, *, base_url: str = GRAPH_URL,
                 session: GraphTransport | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._token_source = token_source
        self._base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._session = session or self.new_session()

    @staticmethod
    def new_session(pool_size: int = 16, *, settings: Settings | None = None) -> GraphTransport:
        """A transport to share between clients: our keep-alive connections (the CA bundle from ``settings``),
        or a pooled ``requests`` session reading proxies per request when ``Settings.http_clients_read_env``."""
        if settings is not None and settings.http_clients_read_env:
            return RequestsTransport(pool_size)
        return KeepAliveTransport(ca_bundle=settings.http_ca_bundle if settings is not None else None)

    @property
    def base_url(self) -> str:
        return self._base_url

    def url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self._base_url}/{path_or_url.lstrip('/')}"

    def request(self, method: str, path_or_url: str, *, params: Mapping[str, str] | None = None,
                json_body: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        """Send one request; return the parsed JSON body (None for 204)."""
        url = self.url(path_or_url)
        response = self._send(method, url, params, json_body, headers, force_refresh=False)
        if response.status == 401:
            response = self._send(method, url, params, json_body, headers, force_refresh=True)
        return self._parse(response)

    def get(self, path_or_url: str, *, params: Mapping[str, str] | None = None,
            headers: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path_or_url, params=params, headers=headers)

    def batch_get(self, reads: Sequence[tuple[str, Mapping[str, str] | None, Mapping[str, str] | None]]
                  ) -> list[Any | MailsyncError]:
        """GETs sent as one JSON batch (``POST $batch``, at most ``BATCH_MAX`` of them): one round trip.

        ``reads``: (path under the root or an absolute link on it, query parameters, headers) each.
        Returns, per read in order, its parsed body or the project's error for its answer. Graph
        authenticates, throttles and answers each item on its own (a 429 of one item inside a 200
        envelope), so one item's error is that read's alone; an error of the envelope itself raises.
        Items refused for the token (401) are sent again once, after a forced refresh, as ``request``
        does; those alone: a token that expires while Graph executes the batch (four items at a time)
        is refused for the items dispatched after it only, and the others were served (a delta page
        read twice is a request spent on the mailbox's quota for nothing). Headers go on every item
        (Graph does not carry the envelope's ``Prefer`` over to them).
        """
        if not reads:
            return []
        if len(reads) > BATCH_MAX:
            raise ValueError(f"a JSON batch holds at most {BATCH_MAX} requests, not {len(reads)}")
        items = [self._batch_item(str(n), *read) for n, read in enumerate(reads)]
        answers = self._batch(items, force_refresh=False)
        refused = [item for item in items if (answer := answers.get(item["id"])) is not None and answer.status == 401]
        if refused:
            answers.update(self._batch(refused, force_refresh=True))
        found: list[Any | MailsyncError] = []
        for n in range(len(reads)):
            answer = answers.get(str(n))
            if answer is None:
                found.append(MalformedResponse("Graph's batch answer left a request out"))
            elif 200 <= answer.status < 300:
                found.append(answer.body)
            else:
                found.append(error_for_status(answer.status, answer.body, answer.retry_after))
        return found

    def _batch_item(self, item_id: str, path_or_url: str, params: Mapping[str, str] | None,
                    headers: Mapping[str, str] | None) -> dict[str, Any]:
        url = self.url(path_or_url)
        if not url.startswith(self._base_url + "/"):
            raise CursorExpired("a link outside the Graph root cannot be batched")
        relative = url[len(self._base_url):]
        if params:
            # OData's names keep their "$" (and the $select list its commas), as Graph's own links write them.
            relative += ("&" if "?" in relative else "?") + "&".join(
                f"{quote(k, safe='$')}={quote(v, safe=',$')}" for k, v in params.items())
        prefer = 'IdType="ImmutableId"'
        extra = {k: v for k, v in (headers or {}).items() if k.lower() != "prefer"}
        prefer = ", ".join([prefer, *(v for k, v in (headers or {}).items() if k.lower() == "prefer")])
        return {"id": item_id, "method": "GET", "url": relative, "headers": {"Prefer": prefer, **extra}}

    def _batch(self, items: list[dict[str, Any]], *, force_refresh: bool) -> dict[str, _BatchAnswer]:
        """Send the items as one batch; per item id its answer."""
        response = self._send("POST", self.url("$batch"), None, {"requests": items}, None,
                              force_refresh=force_refresh)
        if response.status == 401 and not force_refresh:
            response = self._send("POST", self.url("$batch"), None, {"requests": items}, None, force_refresh=True)
        answer = self._parse(response)
        responses = answer.get("responses") if isinstance(answer, dict) else None
        if not isinstance(responses, list):
            raise MalformedResponse("Graph's batch answer has no responses array")
        found: dict[str, _BatchAnswer] = {}
        for item in responses:
            if isinstance(item, dict) and isinstance(item.get("status"), int):
                headers = item.get("headers")
                retry_after = next((str(v) for k, v in headers.items() if k.lower() == "retry-after"), None) \
                    if isinstance(headers, dict) else None
                found[str(item.get("id"))] = _BatchAnswer(item["status"], item.get("body"), retry_after)
        return found

    def get_bytes(self, path_or_url: str, *, max_bytes: int) -> tuple[bytes, str]:
        """A binary resource (an attachment's ``$value``): its bytes and Content-Type.

        Read no further than ``max_bytes`` (``PayloadTooLarge``): a size Graph
        reported is not trusted to bound what it sends.
        """
        url = self.url(path_or_url)
        try:
            response = self._send("GET", url, None, None, {"Accept": "*/*"}, force_refresh=False,
                                  max_bytes=max_bytes)
            if response.status == 401:
                response = self._send("GET", url, None, None, {"Accept": "*/*"}, force_refresh=True,
                                      max_bytes=max_bytes)
        except BodyTooLarge as exc:
            raise PayloadTooLarge(f"the attachment is larger than {max_bytes} bytes",
                                  code="attachment_too_large") from exc
        if not 200 <= response.status < 300:
            self._parse(response)   # raises the mapped error
        return response.body, response.headers.get("content-type", "application/octet-stream")

    def close(self) -> None:
        self._session.close()

    def _send(self, method: str, url: str, params: Mapping[str, str] | None, json_body: Any,
              headers: Mapping[str, str] | None, *, force_refresh: bool, max_bytes: int | None = None
              ) -> GraphResponse:
        all_headers = {
            "Authorization": f"Bearer {self._token_source(force_refresh)}",
            "Prefer": 'IdType="ImmutableId"',
            "Accept": "application/json",
        }
        if headers:
            for key, value in headers.items():
                if key.lower() == "prefer":
                    # Prefer values combine; ImmutableId must ride on every call.
                    all_headers["Prefer"] = f"{all_headers['Prefer']}, {value}"
                else:
                    all_headers[key] = value
        data = None
        if json_body is not None:
            data = orjson.dumps(json_body)
            all_headers["Content-Type"] = "application/json"
        if params:   # encoded as requests encodes them (urlencode: quote_plus)
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        try:
            return self._session.send(method, url, all_headers, data, timeout_s=self._timeout_s,
                                      max_bytes=max_bytes)
        except TransportFailed as exc:
            raise ProviderUnavailable(f"Graph request failed: {exc}") from exc

    def _parse(self, response: GraphResponse) -> Any:
        status = response.status
        content = response.body
        body: Any = None
        if content:
            try:
                body = orjson.loads(content)
            except orjson.JSONDecodeError as exc:
                if 200 <= status < 300:
                    raise MalformedResponse(f"Graph sent a body that is not JSON (status {status})") from exc
        if 200 <= status < 300:
            return body
        raise error_for_status(status, body, response.headers.get("retry-after"))


@dataclass(frozen=True)
class _BatchAnswer:
    """One item's answer inside a JSON batch's envelope."""

    status: int
    body: Any
    retry_after: str | None


def error_for_status(status: int, body: Any, retry_after_header: str | None) -> MailsyncError:
    """The project's error for a Graph error answer (also for one item of a ``$batch``)."""
    code = graph_error_code(body)
    retry_after = parse_retry_after(retry_after_header)
    if status == 401:
        return ProviderAuthError(f"Graph rejected the token ({code or 'unauthorized'})")
    if is_expired_state(status, code):
        return CursorExpired(f"Graph sync state expired ({status} {code or 'syncStateNotFound'})")
    if status == 404:
        return NotFound(f"Graph resource not found ({code or 'ErrorItemNotFound'})")
    if status == 429:
        return ProviderThrottled(f"Graph throttled the request ({code or 'TooManyRequests'})",
                                 retry_after_s=retry_after if retry_after is not None else 0.0,
                                 code="provider_throttled")
    if status in (500, 502, 503, 504):
        return ProviderUnavailable(f"Graph answered {status} ({code})", retry_after_s=retry_after)
    return ProviderError(f"Graph answered {status} ({code or 'error'})")
