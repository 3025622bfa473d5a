"""The outbound address policy: every spelling of a special-use address is refused, before any connection.

The checks run on what the system resolver returns (real ``getaddrinfo``),
so these cases also prove that the numeric spellings the resolver accepts
(``127.1``, ``2130706433``, ``0x7f.1``, octal) cannot get past it.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mailsync.errors import AddressRefused, ConfigurationError, ProviderUnavailable
from mailsync.providers.imap_session import ImapEndpoint, ImapSession
from mailsync.security.outbound import STRICT, OutboundPolicy, refusal_reason

REFUSED = [
    "127.0.0.1", "127.1", "2130706433", "0x7f.1", "0177.0.0.1", "0x7f000001", "127.255.255.254", "localhost",
    "LOCALHOST", "0.0.0.0", "0", "::1", "[::1]", "::", "::ffff:127.0.0.1", "::ffff:7f00:1", "::127.0.0.1",
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254", "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "2002:a00:1::1", "fd00::1", "fc00::1", "fe80::1", "fec0::1",
    "ff02::1", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.10", "198.51.100.1",
    "203.0.113.9", "198.18.0.1", "192.0.0.8", "2001:db8::1", "2001::1", "100::1", "4000::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("host", REFUSED)
def test_special_use_addresses_are_refused_in_every_spelling(host: str) -> None:
    with pytest.raises(AddressRefused) as refused:
        STRICT.resolve(host, 993)
    assert refused.value.http_status == 400 and refused.value.code == "address_not_allowed"
    assert "outbound address policy" in refused.value.message
    # The refusal names the policy, never what the name resolved to.
    assert "127.0.0.1" not in refused.value.message.replace(host, "")


@pytest.mark.parametrize("host", ALLOWED)
def test_public_unicast_addresses_pass_and_come_back_pinned(host: str) -> None:
    resolved = STRICT.resolve(host, 993)
    assert resolved.host == host and resolved.port == 993
    assert [ipaddress.ip_address(a) for a in resolved.addresses] == [ipaddress.ip_address(host)]


def test_one_refused_address_refuses_the_name() -> None:
    def resolver(*_args: Any, **_kwargs: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 993)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 993))]
    with pytest.raises(AddressRefused):
        OutboundPolicy(resolver=resolver).resolve("mixed.example.com", 993)


def test_an_unknown_name_is_a_provider_failure_not_a_crash() -> None:
    with pytest.raises(ProviderUnavailable) as failed:
        STRICT.resolve("no-such-host.invalid", 993)
    assert failed.value.code == "host_not_found"


def test_the_allow_list_opens_networks_and_names_only() -> None:
    policy = OutboundPolicy.from_entries(["127.0.0.1/32", "::1", "Localhost."])
    assert policy.resolve("127.0.0.1", 143).addresses == ("127.0.0.1",)
    assert policy.resolve("127.1", 143).addresses == ("127.0.0.1",)
    assert policy.resolve("[::1]", 143).addresses == ("::1",)
    assert policy.resolve("localhost", 143).addresses
    for outside in ("127.0.0.2", "10.0.0.1", "169.254.169.254"):
        with pytest.raises(AddressRefused):
            policy.resolve(outside, 143)
    with pytest.raises(ConfigurationError):
        OutboundPolicy.from_entries(["not a host/99"])


def test_refusal_reasons_name_the_range() -> None:
    assert refusal_reason(ipaddress.ip_address("169.254.169.254")) == "link-local"
    assert refusal_reason(ipaddress.ip_address("::ffff:10.0.0.1")) == "private"
    assert refusal_reason(ipaddress.ip_address("fd12::1")) == "unique-local"
    assert refusal_reason(ipaddress.ip_address("8.8.4.4")) is None


@pytest.fixture
def listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback port that counts the connections it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "localhost", "0x7f.1"])
def test_an_imap_session_refuses_before_connecting(host: str, listener: tuple[int, list[socket.socket]]) -> None:
    port, accepted = listener
    with pytest.raises(AddressRefused):
        ImapSession.connect(ImapEndpoint(host, port, "none", "u"), lambda _force: "pw", allow_insecure=True,
                            timeout_s=2)
    assert accepted == [], "no connection was made"


def test_the_session_connects_to_the_checked_address_not_a_second_lookup(
        listener: tuple[int, list[socket.socket]]) -> None:
    """DNS rebinding: the first answer is checked, a second lookup would say 10.0.0.1; only one lookup happens."""
    port, accepted = listener
    answers = iter(["127.0.0.1", "10.0.0.1"])
    lookups: list[str] = []

    def resolver(host: str, *_args: Any, **_kwargs: Any) -> list[tuple[Any, ...]]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    policy = OutboundPolicy.from_entries(["127.0.0.0/8"], resolver=resolver)
    with pytest.raises(ProviderUnavailable):
        # The fake server greets, then says nothing to LOGIN: the read times out. What matters is where it went.
        ImapSession.connect(ImapEndpoint("rebinding.example", port, "none", "u"), lambda _force: "pw",
                            allow_insecure=True, timeout_s=0.5, policy=policy)
    assert lookups == ["rebinding.example"] and len(accepted) == 1
