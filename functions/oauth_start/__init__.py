"""``POST /api/accounts``: create a local account and start linking it (oauth_start).

Body ``{"provider": "outlook", "return_url": "<optional, allow-listed>"}`` →
201 ``{"account_id", "authorize_url", "access_token", "status"}``. With
``"account_id"`` and the account's bearer token it restarts linking for an
existing account (retry after an error, re-link after ``reauth_required``)
→ 200 without a new access token.

Starting a redirect sign-in also sets the sign-in cookie (HttpOnly,
SameSite=Lax, Secure over https) that binds it to this browser; the
callback refuses the sign-in without it (mailsync/linking/browser_binding.py).

``async``, with threads of its own: an IMAP link waits on a login check
against a server the caller chose (the check itself runs on the linker's
bounded pool, 503 when full). On the host's shared pool twenty such
requests held every thread and starved the other functions; here they
can only fill this function's threads.

A linked account's initial sync job goes out inside the call; a WAKE
follows through the queue output binding, so the host polls its queue at
once instead of after its idle back-off (mailsync.jobs.WakingJobQueue).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import azure.functions as func

from functions._shared.caller import caller_of
from functions._shared.http import bearer_token, handle_errors, json_response, on_own_threads, read_json_object
from functions._shared.runtime import runtime
from mailsync.jobs import JobOutbox
from mailsync.logs import log_context

bp = func.Blueprint()


@functools.cache
def _threads() -> ThreadPoolExecutor:
    # Every login-check slot can hold one thread here while it waits; four more keep Outlook starts
    # and the quick 503s of a full check pool flowing meanwhile.
    return ThreadPoolExecutor(max_workers=runtime().settings.imap_verify_concurrency + 4,
                              thread_name_prefix="accounts")


@bp.function_name("oauth_start")
@bp.route(route="accounts", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@bp.queue_output(arg_name="jobs", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
async def oauth_start(req: func.HttpRequest, jobs: func.Out[list[str]]) -> func.HttpResponse:
    return await on_own_threads(_threads(), functools.partial(_start, jobs=jobs), req)


@handle_errors
def _start(req: func.HttpRequest, jobs: func.Out[list[str]]) -> func.HttpResponse:
    rt = runtime()
    body = read_json_object(req, max_bytes=rt.settings.max_body_bytes)
    bearer = bearer_token(req) if "account_id" in body else None  # only a re-link is authenticated
    outbox = JobOutbox()   # the WAKE after an account's initial sync job (LinkingService._jobs_for)
    with log_context(function="oauth_start"):
        result = rt.linking.start(body, bearer, caller_of(req, rt.settings.trusted_proxy_hops), outbox=outbox)
    if outbox:
        jobs.set(outbox.bodies())
    headers = {}
    if result.browser_nonce is not None:
        headers["Set-Cookie"] = rt.browser_binding.set_cookie(result.browser_nonce)
    return json_response(result.to_json(), 201 if result.created else 200, headers)
