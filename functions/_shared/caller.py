"""Who is calling, as far as an HTTP request can tell: what the core's ``Caller`` holds."""

from __future__ import annotations

import azure.functions as func

from mailsync.linking.browser_binding import BrowserBinding
from mailsync.linking.service import Caller


def caller_of(req: func.HttpRequest) -> Caller:
    """The sign-in cookie the browser sent (if any)."""
    return Caller(browser_nonce=BrowserBinding.nonce_from(req.headers.get("cookie")))
