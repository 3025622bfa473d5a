"""Which client a request came from, for per-client limits: the trusted hop of ``X-Forwarded-For``.

Azure Functions runs behind the App Service front end, which *appends*
the address of the peer that connected to it (often with its port,
``203.0.113.7:49828``) to ``X-Forwarded-For``. Everything to the left of
what our own infrastructure appended was written by someone else and can
be anything the client likes, so the client is the entry ``hops`` places
from the right, where ``hops`` (``TRUSTED_PROXY_HOPS``) is how many proxies
of ours append to the header:

- ``1``: clients reach the Function App's front end directly (and the
  devhost, which appends the peer address the same way);
- ``2``: behind one more proxy that appends the address it saw (the Static
  Web App that forwards ``/api/*``, or Front Door); the rightmost entry is
  then that proxy's own address, shared by every user.

A header with fewer entries than ``hops`` did not come through the chain
we expect (a caller that bypassed the proxy): its leftmost entry is all
there is, and it may be forged, so such requests share the bucket of that
claimed address; docs/security.md says to keep the Function App reachable
only through the proxy in that setup.

IPv6 clients are bucketed by their /64: one subscriber usually holds a
whole /64, and per-address limits would be free to dodge.
"""

from __future__ import annotations

import ipaddress

UNKNOWN_CLIENT = "unknown"


def _address(entry: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One ``X-Forwarded-For`` entry as an address: ``a.b.c.d``, ``a.b.c.d:port``, ``v6``, ``[v6]:port``."""
    text = entry.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]   # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def client_address(forwarded_for: str | None, trusted_hops: int) -> str | None:
    """The client's address as our ``trusted_hops``-th proxy from the right saw it, or None."""
    if not forwarded_for or trusted_hops < 1:
        return None
    entries = [e for e in forwarded_for.split(",") if e.strip()]
    if not entries:
        return None
    address = _address(entries[-min(trusted_hops, len(entries))])
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def client_key(address: str | None) -> str:
    """The bucket a client address is limited in: the IPv4 address, the IPv6 /64, or ``unknown``."""
    if address is None:
        return UNKNOWN_CLIENT
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{parsed}/64", strict=False))
    return str(parsed)
