"""The outbound address policy: where mailsync may connect for a host name a user typed.

Linking an IMAP account (and any future provider with user-supplied
servers) makes *our* servers open a connection to a host chosen by an
anonymous caller. Without a policy that is a server-side request forgery:
a port scanner of our own network, a reader of cloud metadata
(169.254.169.254), a banner grabber of loopback services. So every
connection to a user-supplied host goes through :class:`OutboundPolicy`:

1. **Resolve first.** The name is resolved once (``getaddrinfo``) and the
   check runs on what came back — the exact addresses the socket will use —
   never on the text. Every numeric spelling is the resolver's business:
   ``127.1``, ``2130706433``, ``0x7f.1`` and ``0177.0.0.1`` all come back as
   ``127.0.0.1``, ``[::1]`` as ``::1``, so none of them can slip past a
   textual check that was never made.
2. **Only public unicast addresses.** Every address the name resolves to must
   be one: loopback, private (RFC 1918), shared (CGNAT), link-local, unique
   local, site-local, multicast, unspecified, broadcast, documentation,
   benchmarking, reserved and other special-use ranges are refused, IPv4 and
   IPv6 alike. IPv6 forms that carry an IPv4 address (``::ffff:a.b.c.d``,
   NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that IPv4
   address; IPv4-compatible (``::a.b.c.d``) and Teredo are refused outright.
   One refused address refuses the name: a name that resolves partly
   inside is not an accident.
3. **Connect to the checked address** (:meth:`OutboundPolicy.connect`), never
   to the name again: a second lookup could answer differently (DNS
   rebinding, TTL 0). TLS still sends the host name (SNI) and verifies the
   certificate against it; only the TCP connect uses the pinned address.
4. **Every connection, not only the first.** Linking, the sync engine, the
   STATUS poller and the listener all connect through the same session code
   (``ImapSession.connect``), which resolves and checks each time: a name
   that moved into a private range after linking is refused from then on.

``IMAP_ALLOWED_HOSTS`` (comma-separated CIDRs, addresses or host names)
opens exceptions for development and tests (a Dovecot on loopback).
Production leaves it empty. A listed *name* is trusted whatever it resolves
to (still pinned); a listed *network* admits any name resolving into it.

A refusal names the policy, never the resolved address or which range it
fell in: that would turn the check into a resolver of internal names.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mailsync.errors import AddressRefused, ConfigurationError, ProviderUnavailable

log = logging.getLogger("mailsync.security.outbound")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

POLICY_MESSAGE = ("{host} is refused by the outbound address policy: mailsync connects only to public internet "
                  "addresses (never loopback, private, link-local or other special-use ones)")
_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*$")

# Ranges refused by name (IANA special-purpose registries, RFC 6890 and successors). Python's
# ``is_global`` is consulted as well, as a second opinion, after these.
_V4_REFUSED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "special-use"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "special-use"),        # 6to4 relay anycast (deprecated)
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "special-use"),         # benchmarking
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),              # includes 255.255.255.255 (broadcast)
)
_V6_REFUSED: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "special-use"),                 # IPv4-compatible (deprecated)
    ("64:ff9b:1::/48", "special-use"),        # local-use NAT64
    ("100::/64", "special-use"),              # discard-only
    ("2001::/32", "special-use"),             # Teredo: the IPv4 end is not ours to check
    ("2001::/23", "special-use"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_V4_TABLE = tuple((ipaddress.IPv4Network(net), why) for net, why in _V4_REFUSED)
_V6_TABLE = tuple((ipaddress.IPv6Network(net), why) for net, why in _V6_REFUSED)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def refusal_reason(address: IPAddress) -> str | None:
    """Why mailsync must not connect to ``address`` (a range's name), or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return refusal_reason(embedded)
        for network, why in _V6_TABLE:
            if address in network:
                return why
        if address not in _GLOBAL_UNICAST:
            return "reserved"
    else:
        for network4, why in _V4_TABLE:
            if address in network4:
                return why
    return None if address.is_global else "special-use"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to ``address`` really goes to (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


@dataclass(frozen=True)
class ResolvedHost:
    """A host name and the addresses it resolved to, each checked: connect to these, not to the name."""

    host: str                      # as the user gave it: TLS SNI and certificate checks use it
    port: int
    addresses: tuple[str, ...]     # in the resolver's order of preference


class OutboundPolicy:
    """Resolve, check and connect to user-supplied hosts (see the module docstring)."""

    def __init__(self, networks: Iterable[Network] = (), names: Iterable[str] = (), *,
                 resolver: Resolver = socket.getaddrinfo) -> None:
        self._networks = tuple(networks)
        self._names = frozenset(_normal_name(n) for n in names)
        self._resolver = resolver

    @classmethod
    def from_entries(cls, entries: Iterable[str], *, resolver: Resolver = socket.getaddrinfo) -> OutboundPolicy:
        """A policy allowing ``entries`` (CIDRs, addresses or host names: IMAP_ALLOWED_HOSTS); ConfigurationError."""
        networks: list[Network] = []
        names: list[str] = []
        for raw in entries:
            entry = raw.strip().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = _normal_name(entry)
            if not _NAME.match(name) or name.replace(".", "").isdigit():
                raise ConfigurationError(f"IMAP_ALLOWED_HOSTS entry {raw!r} is neither a CIDR, an address nor a "
                                         "host name")
            names.append(name)
        return cls(networks, names, resolver=resolver)

    def resolve(self, host: str, port: int) -> ResolvedHost:
        """Resolve ``host`` and check every address; AddressRefused or ProviderUnavailable (name not found)."""
        name = host.strip().strip("[]")
        try:
            infos = self._resolver(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:   # socket.gaierror is an OSError
            raise ProviderUnavailable(f"the host name {name!r} could not be resolved ({exc})", retry_after_s=30.0,
                                      code="host_not_found") from exc
        addresses: list[str] = []
        for info in infos:
            text = str(info[4][0]).split("%", 1)[0]   # an IPv6 scope (fe80::1%eth0) is not part of the address
            if text not in addresses:
                addresses.append(text)
        if not addresses:
            raise ProviderUnavailable(f"the host name {name!r} has no addresses", retry_after_s=30.0,
                                      code="host_not_found")
        for text in addresses:
            self._check(name, ipaddress.ip_address(text))
        return ResolvedHost(host=name, port=port, addresses=tuple(addresses))

    def _check(self, name: str, address: IPAddress) -> None:
        why = refusal_reason(address)
        if why is None or _normal_name(name) in self._names or any(address in n for n in self._networks
                                                                   if n.version == address.version):
            return
        # The details go to the log only (see the module docstring).
        log.warning("outbound address refused: %s resolves to a %s address", name, why,
                    extra={"outbound_host": name, "outbound_address": str(address), "outbound_range": why})
        raise AddressRefused(POLICY_MESSAGE.format(host=name))

    def connect(self, target: ResolvedHost, timeout_s: float | None) -> socket.socket:
        """A TCP connection to one of ``target``'s checked addresses (tried in order, like create_connection)."""
        last: OSError | None = None
        for address in target.addresses:
            try:
                return socket.create_connection((address, target.port), timeout=timeout_s)
            except OSError as exc:
                last = exc
        assert last is not None  # resolve() never returns an empty address list
        raise last


def _normal_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


STRICT = OutboundPolicy()
"""The production policy: no exceptions."""
