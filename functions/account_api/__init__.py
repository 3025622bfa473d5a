"""``GET`` / ``DELETE /api/accounts/{account_id}`` with the account's bearer token (account_api).

GET → the account (provider, address, display name, status, error,
timestamps, sync progress summary). DELETE → unlink: subscriptions,
tokens, documents and the account itself; 204. A missing or wrong token is
401; another account's token is 404, like an unknown id.
"""

from __future__ import annotations

import azure.functions as func

from functions._shared.http import bearer_token, handle_errors, json_response
from functions._shared.runtime import runtime
from mailsync.logs import log_context

bp = func.Blueprint()


@bp.function_name("account_get")
@bp.route(route="accounts/{account_id}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def account_get(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    with log_context(function="account_get", account_id=account_id):
        view = runtime().linking.get(account_id, bearer_token(req))
    return json_response(view)


@bp.function_name("account_delete")
@bp.route(route="accounts/{account_id}", methods=["DELETE"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def account_delete(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    with log_context(function="account_delete", account_id=account_id):
        runtime().linking.unlink(account_id, bearer_token(req))
    return func.HttpResponse(status_code=204, headers={"Cache-Control": "no-store"})
