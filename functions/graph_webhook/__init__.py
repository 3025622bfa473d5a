"""Graph's change and lifecycle notification endpoints.

``POST /api/graph/webhook`` and ``POST /api/graph/lifecycle``:

* ``?validationToken=…`` (Graph's handshake when a subscription is created)
  is answered first, 200 ``text/plain`` with the decoded token, before the
  composition root is even built — no storage, no settings beyond none —
  because Graph gives us 10 seconds and a cold start eats most of them.
  Plain text with ``nosniff``: a token holding HTML is shown as text, never
  rendered.
* Anything else is a notification collection: the core authenticates each
  item, writes the message states rich notifications carry and tells the
  page (``mailsync.monitoring.notified_states``), and enqueues
  (``mailsync.monitoring``). 202 when the body was well formed, whatever
  was dropped (a forger learns nothing); 400/413/415 for a malformed body;
  503 when storage is down, so Graph retries.

Both functions are ``async``: the host runs synchronous functions on one
shared thread pool, which long sync-worker invocations can fill (Graph
then waits > 3 s, counts a failure and backs off — delaying every later
notification). Here the handshake is answered on the event loop without
any thread, and the (blocking, ~10 ms) notification work runs on a small
pool of the webhook's own, so sync jobs can never make Graph wait.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import azure.functions as func

from functions._shared.http import handle_errors, on_own_threads, read_json
from functions._shared.runtime import runtime
from mailsync.logs import log_context

log = logging.getLogger("mailsync.functions.graph_webhook")

bp = func.Blueprint()

MAX_VALIDATION_TOKEN = 4096
# The webhook's own threads (see the module docstring). A POST is I/O: a table and a queue call, and with
# notified states three store calls and a SignalR call (20-180 ms of wall time at 20 POSTs/s in the
# 1,000-account scale run, where four threads were busy 3.5 of 4 in a slow run and p99 rose to 1.3 s).
_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="graph-webhook")


def validation_response(req: func.HttpRequest) -> func.HttpResponse | None:
    """The handshake answer when ``validationToken`` is present, else None."""
    token = req.params.get("validationToken")
    if token is None:
        return None
    if len(token) > MAX_VALIDATION_TOKEN:
        return func.HttpResponse("validationToken too long", status_code=400, mimetype="text/plain",
                                 charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})
    return func.HttpResponse(token, status_code=200, mimetype="text/plain", charset="utf-8",
                             headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                                      "Content-Security-Policy": "default-src 'none'"})


@bp.function_name("graph_webhook")
@bp.route(route="graph/webhook", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def graph_webhook(req: func.HttpRequest) -> func.HttpResponse:
    handshake = validation_response(req)
    return handshake if handshake is not None else await on_own_threads(_POOL, _notifications, req)


@bp.function_name("graph_lifecycle")
@bp.route(route="graph/lifecycle", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def graph_lifecycle(req: func.HttpRequest) -> func.HttpResponse:
    handshake = validation_response(req)
    return handshake if handshake is not None else await on_own_threads(_POOL, _lifecycle, req)


@handle_errors
def _notifications(req: func.HttpRequest) -> func.HttpResponse:
    rt = runtime()
    with log_context(function="graph_webhook"):
        report = rt.notification_receiver.receive(read_json(req, max_bytes=rt.settings.max_body_bytes))
        log.info("notifications: %d received, %d accepted, %d jobs", report.received, report.accepted,
                 report.jobs_enqueued)
    return func.HttpResponse(status_code=202)


@handle_errors
def _lifecycle(req: func.HttpRequest) -> func.HttpResponse:
    rt = runtime()
    with log_context(function="graph_lifecycle"):
        rt.lifecycle_receiver.receive(read_json(req, max_bytes=rt.settings.max_body_bytes))
    return func.HttpResponse(status_code=202)
