"""Who is calling, as far as an HTTP request can tell: what the core's ``Caller`` holds."""

from __future__ import annotations

import azure.functions as func

from mailsync.linking.browser_binding import BrowserBinding
from mailsync.linking.service import Caller
from mailsync.security.client_ip import client_address, client_key


def caller_of(req: func.HttpRequest, trusted_proxy_hops: int) -> Caller:
    """The sign-in cookie the browser sent (if any) and the client bucket its address falls in.

    The address is the ``X-Forwarded-For`` entry our ``trusted_proxy_hops``-th
    proxy appended (the Functions front end appends the peer it saw; the
    devhost does the same), never one the client wrote itself.
    """
    address = client_address(req.headers.get("x-forwarded-for"), trusted_proxy_hops)
    return Caller(browser_nonce=BrowserBinding.nonce_from(req.headers.get("cookie")), client=client_key(address))
