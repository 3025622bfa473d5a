"""``POST /api/negotiate``: the page's live channel (Azure SignalR Service, serverless).

Bearer = the account's access token → 200 ``{"url", "accessToken"}`` for
that account's SignalR user id (the account id); ``@microsoft/signalr``
then connects to the service with it. A missing, malformed or wrong
token is 401. No ``signalRConnectionInfo`` input binding: its ``userId``
can only come from the request, never from the verified token, so the
core mints the same answer (``mailsync.realtime.connection_info``
explains why and how).
"""

from __future__ import annotations

import azure.functions as func

from functions._shared.http import bearer_token, handle_errors, json_response
from functions._shared.runtime import runtime
from mailsync.logs import log_context

bp = func.Blueprint()


@bp.function_name("signalr_negotiate")
@bp.route(route="negotiate", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def signalr_negotiate(req: func.HttpRequest) -> func.HttpResponse:
    with log_context(function="signalr_negotiate"):
        info = runtime().live_channel.negotiate(bearer_token(req))
    return json_response(info.to_json())
