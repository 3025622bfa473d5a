"""The client address limits count in: the X-Forwarded-For entry our own proxies appended."""

from __future__ import annotations

import pytest

from mailsync.security.client_ip import UNKNOWN_CLIENT, client_address, client_key


@pytest.mark.parametrize(("header", "hops", "expected"), [
    ("203.0.113.7", 1, "203.0.113.7"),
    ("203.0.113.7:49828", 1, "203.0.113.7"),                   # the Functions front end adds the port
    ("6.6.6.6, 203.0.113.7:49828", 1, "203.0.113.7"),          # a forged left entry is ignored
    ("6.6.6.6, 198.51.100.4, 20.1.2.3:443", 2, "198.51.100.4"),  # behind one more proxy of ours
    ("198.51.100.4", 2, "198.51.100.4"),                       # fewer entries than hops: the leftmost
    ("2001:db8::1", 1, "2001:db8::1"),
    ("[2001:db8::1]:5000", 1, "2001:db8::1"),
    ("::ffff:203.0.113.7", 1, "203.0.113.7"),                  # IPv4-mapped is the IPv4 client
    ("1.2.3.4,  ", 1, "1.2.3.4"),
    ("", 1, None),
    (None, 1, None),
    ("not-an-address", 1, None),
    ("1.2.3.4, garbage", 1, None),                             # our own proxy's entry is unreadable: unknown
])
def test_client_address(header: str | None, hops: int, expected: str | None) -> None:
    assert client_address(header, hops) == expected


def test_client_keys_bucket_ipv6_by_64() -> None:
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key(None) == UNKNOWN_CLIENT
