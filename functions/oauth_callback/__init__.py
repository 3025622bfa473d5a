"""``GET /api/oauth/callback``: Microsoft's redirect after sign-in (oauth_callback).

Completes the pending sign-in and answers 302 to the account's return URL
with ``account_id`` (and ``error`` / ``error_description`` when it failed).
An unknown, expired-and-gone or reused ``state`` has no trustworthy return
URL: that is a 400 JSON error instead of a redirect.

A callback from a browser that did not start the sign-in (no sign-in
cookie, or another one: a forwarded sign-in link, login CSRF) gets a plain
403 page saying so, with a link to start again; nothing is linked.

The initial sync job goes out inside the call; a WAKE follows through the
queue output binding (mailsync.jobs.WakingJobQueue), so the host starts it
at once instead of after its queue poll's idle back-off.

``async``, with threads of its own, as ``oauth_start``: the callback is
I/O (about eight table calls, the token exchange and ``/me``, a queue send,
the mailbox document) and a person is waiting on it. On the host's shared
pool it queued behind the sync jobs that earlier sign-ins had started:
while 300 accounts were onboarded on the host and two workers, the
callback spent ~60 % of its ~0.9 s waiting for one of the host's six
threads, and with four sign-ins at a time the sign-ins themselves bounded
onboarding (docs/scaling.md, "Onboarding").
"""

from __future__ import annotations

import functools
import html
from concurrent.futures import ThreadPoolExecutor

import azure.functions as func

from functions._shared.caller import caller_of
from functions._shared.http import handle_errors, on_own_threads
from functions._shared.runtime import runtime
from mailsync.errors import SignInElsewhere
from mailsync.jobs import JobOutbox
from mailsync.logs import log_context

bp = func.Blueprint()

# The query parameters the identity platform sends back; nothing else is passed on.
CALLBACK_PARAMS = ("code", "state", "session_state", "client_info", "error", "error_description", "error_uri")

# The URL of this page holds the code and state: never let it leave in a Referer.
_NO_REFERRER = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}

# The callback's own threads (module docstring). Sixteen: a callback is ~0.1-0.4 s of waiting on
# Tables and the identity platform, so sixteen carry dozens of sign-ins a second, and a burst beyond
# that waits here, not in front of the sync jobs.
_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="oauth-callback")


def refused_page(error: SignInElsewhere, start_url: str) -> func.HttpResponse:
    """A small self-contained page: no script, no external resources, not frameable."""
    body = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>mailsync · Sign-in not completed</title></head><body>"
        "<h1>Sign-in not completed</h1>"
        f"<p>{html.escape(error.message)}</p>"
        f"<p><a href=\"{html.escape(start_url, quote=True)}\">Add an account</a></p>"
        "</body></html>"
    )
    return func.HttpResponse(body, status_code=error.http_status, mimetype="text/html", charset="utf-8", headers={
        **_NO_REFERRER,
        "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
    })


@bp.function_name("oauth_callback")
@bp.route(route="oauth/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@bp.queue_output(arg_name="jobs", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
async def oauth_callback(req: func.HttpRequest, jobs: func.Out[list[str]]) -> func.HttpResponse:
    return await on_own_threads(_POOL, functools.partial(_complete, jobs=jobs), req)


@handle_errors
def _complete(req: func.HttpRequest, jobs: func.Out[list[str]]) -> func.HttpResponse:
    params = {key: req.params[key] for key in CALLBACK_PARAMS if req.params.get(key) is not None}
    rt = runtime()
    outbox = JobOutbox()   # the WAKE after the initial sync job (LinkingService._jobs_for)
    with log_context(function="oauth_callback"):
        try:
            location = rt.linking.complete(params, caller_of(req, rt.settings.trusted_proxy_hops), outbox=outbox)
        except SignInElsewhere as refused:
            return refused_page(refused, f"{rt.settings.public_base_url}/index.html")
    if outbox:
        jobs.set(outbox.bodies())
    return func.HttpResponse(status_code=302, headers={"Location": location, **_NO_REFERRER})
