"""JSON batching (``POST /v1.0/$batch``): up to 20 requests in one, each answered as if sent alone."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from graph_sandbox import payloads
from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.mail_request import JSON_TYPE
from graph_sandbox.mailbox import MailboxError

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxState

# One item through the mail API's whole request path (authenticate ... operation): the item's request,
# its ids, its parsed body and its path.
ItemHandler = Callable[..., Awaitable[web.StreamResponse]]


@dataclass
class BatchItemRequest:
    """The parts of a request the mail API's request path reads, for one ``$batch`` item (its body comes parsed).

    aiohttp cannot clone a request whose body was read, and the batch's
    body had to be read to find the items.
    """

    method: str
    headers: CIMultiDict[str]
    scheme: str
    host: str
    query: MultiMapping[str]
    can_read_body: bool = False
    transport: None = None


BATCH_MAX = 20
BATCH_PARALLEL = 4     # Graph dispatches up to four items of a batch at once


def _batch_answer(item_id: str, response: web.StreamResponse) -> dict[str, Any]:
    """One ``responses`` entry: JSON bodies inline, other bodies base64 (as Graph encodes them)."""
    keep = {str(k): v for k, v in response.headers.items()
            if k.lower() in ("content-type", "retry-after", "location", "preference-applied")}
    answer: dict[str, Any] = {"id": item_id, "status": response.status, "headers": keep}
    body = response.body if isinstance(response, web.Response) else None
    raw = body if isinstance(body, bytes) else b""
    if raw:
        if "json" in keep.get("Content-Type", "").lower():
            answer["body"] = orjson.loads(raw)
        else:
            answer["body"] = base64.b64encode(raw).decode("ascii")
    return answer


class BatchRoutes:
    """``$batch``: the envelope's checks and latency, the items four at a time (see ``answer``)."""

    def __init__(self, state: SandboxState, handle_item: ItemHandler,
                 error_reply: Callable[[ApiError, dict[str, str]], web.Response]) -> None:
        self.state = state
        self._handle_item = handle_item
        self._error_reply = error_reply

    async def answer(self, request: web.Request, ids: dict[str, str]) -> web.Response:
        """JSON batching: up to 20 requests in one POST, answered in one 200.

        As Graph does, each item is its own request for authentication,
        permissions and throttling (an item over the mailbox's concurrency
        gets its own 429 inside a 200 envelope), and up to four items are
        dispatched at once. Items with ``dependsOn`` run in order, and an
        item whose dependency failed is answered 424.

        What an item costs, in Microsoft's words: "Requests in a batch are
        evaluated individually against throttling limits" (json-batching,
        "Batch size limitations"), and for Outlook "Microsoft Graph sends
        the Outlook service up to four individual requests from the batch at
        a time [...] Since Microsoft Graph sends only up to four requests to
        run in parallel, the execution of that batch stays within Outlook's
        concurrency limits for the same mailbox"; with ``dependsOn``, "one
        request from the batch at a time [...] and have up to four such
        batch requests run concurrently" (throttling-limits, "Outlook
        service limits for JSON batching"). The items are dispatched inside
        Microsoft's network; the client's round trip is the one POST. So the
        envelope pays ``latency_ms`` once, and each item holds one of the
        mailbox's concurrency slots while it executes (``execution_ms``).
        Charging the latency to every item, four at a time, made a batch of
        20 cost five round trips: 500 actions in 25 batches took at least
        12.5 s at 100 ms where Graph allows ~0.7 s (four dependsOn batches
        at a time, seven rounds).
        """
        if request.method != "POST":
            raise ApiError(405, "BadRequest", f"The HTTP method '{request.method}' is not supported for this resource.")
        try:
            envelope = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise bad_request("Unable to read JSON request payload.") from None
        items = envelope.get("requests") if isinstance(envelope, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, "BadRequest", "Invalid batch payload format.")
        if len(items) > BATCH_MAX:
            raise ApiError(400, "BadRequest", f"Batch request cannot contain more than {BATCH_MAX} requests.")
        seen: set[str] = set()
        for item in items:
            if (not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]
                    or not isinstance(item.get("method"), str) or not isinstance(item.get("url"), str)):
                raise ApiError(400, "BadRequest", "Each batch request needs a string id, method and url.")
            if item["id"] in seen:
                raise ApiError(400, "BadRequest", f"Batch request ids must be unique: '{item['id']}'.")
            seen.add(item["id"])
        if self.state.config.latency_ms:
            await asyncio.sleep(self.state.config.latency_ms / 1000)      # the round trip, once
        slots = asyncio.Semaphore(BATCH_PARALLEL)
        statuses: dict[str, int] = {}

        async def run(item: dict[str, Any]) -> dict[str, Any]:
            async with slots:
                depends = item.get("dependsOn") or []
                if any(statuses.get(d, 424) >= 400 for d in depends):
                    answer = {"id": item["id"], "status": 424,
                              "body": payloads.error("FailedDependency", "A request this one depends on failed.",
                                                     request_id=ids["request-id"],
                                                     client_request_id=ids["client-request-id"],
                                                     date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))}
                else:
                    answer = await self._batch_item(request, item, ids)
                statuses[item["id"]] = answer["status"]
                return answer

        if any(item.get("dependsOn") for item in items):
            answers = [await run(item) for item in items]
        else:
            answers = list(await asyncio.gather(*(run(item) for item in items)))
        return web.Response(status=200, body=orjson.dumps({"responses": answers}),
                            headers={**ids, "Content-Type": JSON_TYPE, "OData-Version": "4.0"})

    async def _batch_item(self, request: web.Request, item: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
        method = item["method"].upper()
        url = item["url"].lstrip("/")
        item_headers = item.get("headers") or {}
        if not isinstance(item_headers, dict):
            item_headers = {}
        # Only the caller's token carries over; Prefer (ImmutableId...) must be on each item, as on Graph.
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        headers.update({str(k): str(v) for k, v in item_headers.items()})
        has_body = "body" in item
        response: web.StreamResponse
        item_ids = {"request-id": str(uuid.uuid4()), "client-request-id": ids["client-request-id"]}
        if has_body and not any(k.lower() == "content-type" for k in item_headers):
            response = self._error_reply(ApiError(400, "BadRequest", "Content-Type header is required when a body is "
                                            "present."), item_ids)
        else:
            target = URL(f"/v1.0/{url}")
            path = target.path[len("/v1.0/"):]          # percent-decoded, as aiohttp gives a route's tail
            try:
                clone = BatchItemRequest(method=method, headers=CIMultiDict(headers), scheme=request.scheme,
                                         host=request.host, query=target.query)
                body = (item.get("body"),) if has_body else None
                response = await self._handle_item(clone, item_ids, batch_body=body, tail=path)
            except web.HTTPException as exc:
                self.state.counters.record(exc.status)
                response = web.Response(status=exc.status, body=exc.text, headers={**item_ids, **exc.headers})
            except ApiError as exc:
                response = self._error_reply(exc, item_ids)
            except MailboxError as exc:
                response = self._error_reply(ApiError(exc.status, exc.code, exc.message), item_ids)
        return _batch_answer(item["id"], response)
