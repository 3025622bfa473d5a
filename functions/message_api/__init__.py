"""The client half of the API: read one message whole, act on messages (mailsync.actions.service).

* ``GET    /api/accounts/{id}/messages/{message_id}`` → the whole message (body sanitised, attachment list).
* ``GET    /api/accounts/{id}/messages/{message_id}/attachments/{attachment_id}`` → the bytes, as a download.
* ``PATCH  /api/accounts/{id}/messages/{message_id}`` ``{is_read, flag_status, folder_id}`` → 202 + the row.
* ``DELETE /api/accounts/{id}/messages/{message_id}?permanent=true|false`` → 202.
* ``POST   /api/accounts/{id}/messages/actions`` ``{message_ids: [...≤500], action: {...}}`` → 202.

Bearer-protected and account-scoped like the read API (401, 404 for
another account's); every bad input is a 4xx from the core.

The three actions publish the optimistic rows at once (``messagesChanged``
to the account), so the user's other pages show the change before the ACTION
job reached the provider: sent through the SignalR service's REST API as
soon as the rows are stored, while the function still queues the job
(``ImmediatePublisher``, mailsync.realtime.live_sender); only what could
not be sent so goes out through the SignalR output binding, which the host
writes after the function returned. Their ACTION job is sent inside the call, and a WAKE message goes
out through a queue output binding (``mailsync.jobs.WakingJobQueue``): the
host then wakes its own queue listener at once instead of leaving the job to
its next poll.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

import azure.functions as func

from functions._shared.http import bearer_token, handle_errors, json_response, read_json, read_json_object
from functions._shared.runtime import runtime
from mailsync.jobs import JobOutbox, WakingJobQueue
from mailsync.logs import log_context
from mailsync.realtime.signalr_messages import BufferingPublisher, ImmediatePublisher

bp = func.Blueprint()

_UNSAFE_NAME = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|;]+')


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII fallback name and the UTF-8 one (RFC 6266 / 5987), nothing a header can break on."""
    cleaned = _UNSAFE_NAME.sub("_", unicodedata.normalize("NFC", name)).strip(" .") or "attachment"
    cleaned = cleaned[:180]
    ascii_name = cleaned.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(cleaned, safe='')}"


def _ids(req: func.HttpRequest) -> tuple[str, str]:
    return req.route_params.get("account_id", ""), req.route_params.get("message_id", "")

# The account's live channel, as functions/sync_worker sets it (set once, when the call returns): what
# ImmediatePublisher could not send at once.
_signalr_output = bp.generic_output_binding(arg_name="signalr", type="signalR", hub_name="%SIGNALR_HUB%",
                                            connection_string_setting="AzureSignalRConnectionString")


# A WAKE message on the queue sync_worker listens to, after the ACTION job (mailsync.jobs.WakingJobQueue).
_jobs_output = bp.queue_output(arg_name="jobs", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")


def _waking(outbox: JobOutbox) -> WakingJobQueue:
    return WakingJobQueue(runtime().job_queue, outbox)


def _publish(events: BufferingPublisher, signalr: func.Out[str], outbox: JobOutbox, jobs: func.Out[list[str]]) -> None:
    if outbox:
        jobs.set(outbox.bodies())
    if events:
        signalr.set(events.messages_json())


@bp.function_name("message_read")
@bp.route(route="accounts/{account_id}/messages/{message_id}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def message_read(req: func.HttpRequest) -> func.HttpResponse:
    account_id, message_id = _ids(req)
    with log_context(function="message_read", account_id=account_id):
        body = runtime().message_actions.read_message(account_id, bearer_token(req), message_id)
    return json_response(body)


@bp.function_name("message_attachment")
@bp.route(route="accounts/{account_id}/messages/{message_id}/attachments/{attachment_id}", methods=["GET"],
          auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def message_attachment(req: func.HttpRequest) -> func.HttpResponse:
    account_id, message_id = _ids(req)
    with log_context(function="message_attachment", account_id=account_id):
        found = runtime().message_actions.read_attachment(account_id, bearer_token(req), message_id,
                                                          req.route_params.get("attachment_id", ""))
    # Always a download, never rendered here: the bytes are the sender's (an HTML or SVG "attachment"
    # shown inline on our origin would run its scripts with the page's token in reach).
    return func.HttpResponse(found.content, status_code=200, mimetype="application/octet-stream", headers={
        "Content-Disposition": content_disposition(found.info.name),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "Cache-Control": "private, no-store",
        "X-Mailsync-Content-Type": found.info.content_type[:200],
    })


@bp.function_name("message_update")
@bp.route(route="accounts/{account_id}/messages/{message_id}", methods=["PATCH"],
          auth_level=func.AuthLevel.ANONYMOUS)
@_signalr_output
@_jobs_output
@handle_errors
def message_update(req: func.HttpRequest, signalr: func.Out[str], jobs: func.Out[list[str]]) -> func.HttpResponse:
    account_id, message_id = _ids(req)
    events, outbox = ImmediatePublisher(runtime().live_sender), JobOutbox()
    with log_context(function="message_update", account_id=account_id):
        token = bearer_token(req)
        body = runtime().message_actions.update(account_id, token, message_id, read_json(req), events,
                                                _waking(outbox))
    _publish(events, signalr, outbox, jobs)
    return json_response(body, 202)


@bp.function_name("message_delete")
@bp.route(route="accounts/{account_id}/messages/{message_id}", methods=["DELETE"],
          auth_level=func.AuthLevel.ANONYMOUS)
@_signalr_output
@_jobs_output
@handle_errors
def message_delete(req: func.HttpRequest, signalr: func.Out[str], jobs: func.Out[list[str]]) -> func.HttpResponse:
    account_id, message_id = _ids(req)
    events, outbox = ImmediatePublisher(runtime().live_sender), JobOutbox()
    with log_context(function="message_delete", account_id=account_id):
        body = runtime().message_actions.delete(account_id, bearer_token(req), message_id,
                                                req.params.get("permanent"), events, _waking(outbox))
    _publish(events, signalr, outbox, jobs)
    return json_response(body, 202)


@bp.function_name("message_actions")
@bp.route(route="accounts/{account_id}/messages/actions", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@_signalr_output
@_jobs_output
@handle_errors
def message_actions(req: func.HttpRequest, signalr: func.Out[str], jobs: func.Out[list[str]]) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    events, outbox = ImmediatePublisher(runtime().live_sender), JobOutbox()
    with log_context(function="message_actions", account_id=account_id):
        token = bearer_token(req)
        body = runtime().message_actions.bulk(account_id, token, read_json_object(req, max_bytes=256_000),
                                              events, _waking(outbox))
    _publish(events, signalr, outbox, jobs)
    return json_response(body, 202)
