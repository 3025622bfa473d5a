"""What the identity platform answers: Entra's error bodies, the redirects back to the app, its HTML pages.

Errors carry Entra's shape (``error``, ``error_description`` with the
AADSTS code and trace/correlation ids, ``error_codes``, ``error_uri``); the
authorize endpoint answers an app's error by redirecting to its verified
redirect URI (``response_mode`` query, fragment or form_post) and anything
else with an error page. Graph's own 401 (``unauthorized``) is Graph's
error envelope with a ``WWW-Authenticate`` challenge, and a claims challenge
under continuous access evaluation.
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from graph_sandbox.app_registrations import OIDC_SCOPES, AppRegistration
from graph_sandbox.identity_records import IdentityCounters, OAuthError, Scopes
from graph_sandbox.tokens import GRAPH_APP_ID


class IdentityAnswers:
    """The platform's answers (see the module docstring); counts every error it answers."""

    def __init__(self, state: Any, counters: IdentityCounters, authority_host: Callable[[], str]) -> None:
        self.state = state
        self._counters = counters
        self._authority_host = authority_host

    def error_body(self, exc: OAuthError) -> dict[str, Any]:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        key = f"{exc.error}:{exc.code}"
        self._counters.errors[key] = self._counters.errors.get(key, 0) + 1
        return {
            "error": exc.error,
            "error_description": f"AADSTS{exc.code}: {exc.message}\r\nTrace ID: {trace}\r\n"
                                 f"Correlation ID: {correlation}\r\nTimestamp: {stamp}",
            "error_codes": [exc.code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"{self._authority_host()}/error?code={exc.code}",
        }

    def error_json(self, exc: OAuthError) -> web.Response:
        return web.json_response(self.error_body(exc), status=exc.status,
                                 headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def error_page(self, exc: OAuthError) -> web.Response:
        body = self.error_body(exc)
        page = _PAGE.format(title="Sign in", body=(
            "<h1>Sorry, but we're having trouble signing you in.</h1>"
            f"<p class='err' data-error='{html.escape(exc.error)}' data-code='AADSTS{exc.code}'>"
            f"AADSTS{exc.code}: {html.escape(exc.message)}</p>"
            f"<p class='small'>Trace ID: {body['trace_id']}<br>Correlation ID: {body['correlation_id']}</p>"))
        return web.Response(text=page, status=400, content_type="text/html")

    def redirect_error(self, params: dict[str, str], exc: OAuthError) -> web.Response:
        body = self.error_body(exc)
        answer = {"error": exc.error, "error_description": body["error_description"],
                  "error_uri": body["error_uri"]}
        if "state" in params:
            answer["state"] = params["state"]
        return self.redirect(params, answer)

    def redirect(self, params: dict[str, str], answer: dict[str, str]) -> web.Response:
        redirect_uri = params["redirect_uri"]
        mode = params.get("response_mode", "query")
        if mode not in ("query", "fragment", "form_post"):
            mode = "query"
        if mode == "form_post":
            inputs = "".join(f"<input type='hidden' name='{html.escape(k)}' value='{html.escape(v)}'>"
                             for k, v in answer.items())
            page = _PAGE.format(title="Working...", body=(
                f"<form method='POST' name='hiddenform' action='{html.escape(redirect_uri)}'>{inputs}"
                "<noscript><p>Script is disabled. Click Submit to continue.</p>"
                "<input type='submit' value='Submit'></noscript></form>"
                "<script>document.forms[0].submit();</script>"))
            return web.Response(text=page, content_type="text/html")
        parts = urlsplit(redirect_uri)
        if mode == "fragment":
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, urlencode(answer)))
        else:
            query = parse_qsl(parts.query, keep_blank_values=True) + list(answer.items())
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})

    def sign_in_page(self, request: web.Request, app: AppRegistration, params: dict[str, str],
                      scopes: Scopes, *, error: str | None = None) -> web.Response:
        hint = params.get("login_hint", "").lower()
        action = html.escape(str(request.rel_url))
        rows = []
        for user in sorted(self.state.users.values(), key=lambda u: u.mail.lower()):
            chosen = " chosen" if hint and hint in (user.mail.lower(), user.user_principal_name.lower()) else ""
            rows.append(
                f"<li><button class='user{chosen}' type='submit' name='username' "
                f"value='{html.escape(user.user_principal_name)}'>"
                f"<b>{html.escape(user.display_name)}</b><br><span>{html.escape(user.mail)}</span>"
                "</button></li>")
        permissions = "".join(f"<li>{html.escape(s)}</li>" for s in scopes.names if s not in OIDC_SCOPES)
        err = f"<p class='err' role='alert'>{html.escape(error)}</p>" if error else ""
        body = (
            f"<div class='brand'>Graph sandbox &middot; {html.escape(str(self.state.tenant_domain))}</div>"
            "<h1>Pick an account</h1>"
            f"<p><b>{html.escape(app.display_name)}</b> wants to sign you in and access:</p>"
            f"<ul class='perm'>{permissions}</ul>{err}"
            f"<form method='POST' action='{action}'><ul class='users'>{''.join(rows)}</ul></form>"
            f"<form method='POST' action='{action}' class='other'>"
            "<label for='username'>Or type an address</label>"
            f"<input id='username' name='username' type='email' autocomplete='username' "
            f"value='{html.escape(params.get('login_hint', ''))}' placeholder='someone@example.com'>"
            "<button type='submit'>Next</button></form>"
            f"<form method='POST' action='{action}'><button class='cancel' type='submit' name='cancel' "
            "value='1'>Cancel</button></form>")
        return web.Response(text=_PAGE.format(title="Sign in to your account", body=body),
                            content_type="text/html", headers={"Cache-Control": "no-store"})


def graph_error_body(code: str, message: str) -> dict[str, Any]:
    """Graph's error envelope (``{"error": {"code", "message", "innerError"}}``)."""
    request_id = str(uuid.uuid4())
    return {"error": {"code": code, "message": message, "innerError": {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": request_id, "client-request-id": request_id}}}


def unauthorized(message: str, *, claims_challenge: bool = False) -> web.HTTPUnauthorized:
    challenge = ('Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                 f'client_id="{GRAPH_APP_ID}"')
    if claims_challenge:
        claims = base64.b64encode(json.dumps(
            {"access_token": {"nbf": {"essential": True, "value": "0"}}}).encode()).decode()
        challenge += f', error="insufficient_claims", claims="{claims}"'
    return web.HTTPUnauthorized(
        text=json.dumps(graph_error_body("InvalidAuthenticationToken", message)),
        content_type="application/json",
        headers={"WWW-Authenticate": challenge})


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:"Segoe UI",system-ui,sans-serif;background:#f2f2f2;margin:0;display:flex;justify-content:center}}
main{{background:#fff;margin-top:8vh;padding:32px 44px;width:min(440px,92vw);box-shadow:0 2px 6px rgba(0,0,0,.2)}}
h1{{font-size:24px;font-weight:600;margin:12px 0}} .brand{{color:#666;font-size:13px}}
ul{{list-style:none;padding:0}} .perm li{{font-size:14px;color:#333}} .perm li:before{{content:"\\2713  "}}
button.user{{width:100%;text-align:left;background:none;border:0;border-bottom:1px solid #ddd;padding:10px 4px;
cursor:pointer;font:inherit}} button.user:hover,button.user.chosen{{background:#eef4fb}}
button.user span{{color:#555;font-size:13px}} .other{{margin-top:16px}}
.other input{{width:100%;padding:6px 0;border:0;border-bottom:1px solid #666;font:inherit;margin:6px 0 12px}}
.other button,.cancel{{background:#0067b8;color:#fff;border:0;padding:6px 20px;font:inherit;cursor:pointer}}
.cancel{{background:#ccc;color:#000;margin-top:8px}} .err{{color:#c50f1f}} .small{{font-size:12px;color:#666}}
</style></head><body><main>{body}</main></body></html>
"""
