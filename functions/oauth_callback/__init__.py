"""``GET /api/oauth/callback``: Microsoft's redirect after sign-in (oauth_callback).

Completes the pending sign-in and answers 302 to the account's return URL
with ``account_id`` (and ``error`` / ``error_description`` when it failed).
An unknown, expired-and-gone or reused ``state`` has no trustworthy return
URL: that is a 400 JSON error instead of a redirect.
"""

from __future__ import annotations

import azure.functions as func

from functions._shared.http import handle_errors
from functions._shared.runtime import runtime
from mailsync.logs import log_context

bp = func.Blueprint()

# The query parameters the identity platform sends back; nothing else is passed on.
CALLBACK_PARAMS = ("code", "state", "session_state", "client_info", "error", "error_description", "error_uri")


@bp.function_name("oauth_callback")
@bp.route(route="oauth/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def oauth_callback(req: func.HttpRequest) -> func.HttpResponse:
    params = {key: req.params[key] for key in CALLBACK_PARAMS if req.params.get(key) is not None}
    with log_context(function="oauth_callback"):
        location = runtime().linking.complete(params)
    return func.HttpResponse(status_code=302, headers={"Location": location, "Cache-Control": "no-store",
                                                       "Referrer-Policy": "no-referrer"})
