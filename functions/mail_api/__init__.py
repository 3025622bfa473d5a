"""The page's read API (bearer-protected, account-scoped) and its public config.

* ``GET /api/accounts/{account_id}/mailboxes`` → the mailbox and its folders with counts.
* ``GET /api/accounts/{account_id}/messages?folder_id=&unread=&flagged=&q=&limit=&cursor=``
  → ``{"messages": [...], "next_cursor"}``, newest first.
* ``GET /api/config`` (anonymous) → sandbox mode and the sandbox mailbox page URL.

401 for a missing or wrong token, 404 for another account's, 400 for a
bad parameter, 503 when the store is down (``mailsync.reading``).
"""

from __future__ import annotations

import azure.functions as func

from functions._shared.http import bearer_token, handle_errors, json_response
from functions._shared.runtime import runtime
from mailsync.logs import log_context
from mailsync.reading import page_config

bp = func.Blueprint()


@bp.function_name("mail_mailboxes")
@bp.route(route="accounts/{account_id}/mailboxes", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def mail_mailboxes(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    with log_context(function="mail_mailboxes", account_id=account_id):
        body = runtime().mail_reader.mailboxes(account_id, bearer_token(req))
    return json_response(body)


@bp.function_name("mail_messages")
@bp.route(route="accounts/{account_id}/messages", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def mail_messages(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    with log_context(function="mail_messages", account_id=account_id):
        body = runtime().mail_reader.messages(account_id, bearer_token(req), dict(req.params))
    return json_response(body)


@bp.function_name("page_config")
@bp.route(route="config", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def config(req: func.HttpRequest) -> func.HttpResponse:
    return json_response(page_config(runtime().settings), headers={"Cache-Control": "public, max-age=300"})
