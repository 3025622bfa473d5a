"""Per-client limits over HTTP, under the devhost: 429 + Retry-After, and which X-Forwarded-For entry counts.

The devhost appends the connecting peer to X-Forwarded-For as Azure's
front end does. With ``TRUSTED_PROXY_HOPS=2`` (a proxy of ours in front,
like the Static Web App) the entry left of it is the client: the test
plays that proxy by sending the header itself, and plays a forger by
putting entries further left.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from devhost.services.process import free_port
from graph_sandbox.config import SandboxConfig
from tests.fixtures.devhost import DevhostProcess, app_settings, start_devhost
from tests.fixtures.graph_sandbox import start_sandbox

KEY_ENTRY = f"lim1:{base64.b64encode(bytes(range(40, 72))).decode()}"


@pytest.fixture(scope="module")
def host(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevhostProcess]:
    sandbox = start_sandbox(SandboxConfig(seed=16, users=1, messages_per_user=1))   # Outlook's sign-in starts
    port = free_port()
    env = app_settings(name="limits", storage=azurite.connection_string, search_store_url=search_store_url,
                       port=port, local_dir=tmp_path_factory.mktemp("local"), key_entry=KEY_ENTRY,
                       TRUSTED_PROXY_HOPS="2", RATE_LIMIT_NEW_ACCOUNTS="2", RATE_LIMIT_IMAP_ATTEMPTS="1",
                       IMAP_TIMEOUT_S="2", GRAPH_SANDBOX_URL=sandbox.base_url)
    handle = start_devhost(env, port=port, functions=["oauth_start", "oauth_callback"],
                           log_dir=tmp_path_factory.mktemp("devhost"))
    try:
        yield handle
    finally:
        handle.stop(timeout_s=15)
        sandbox.stop()


def create(devhost: DevhostProcess, forwarded_for: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.post(f"{devhost.base_url}/api/accounts", json=body or {"provider": "outlook"}, timeout=30,
                         headers={"X-Forwarded-For": forwarded_for})


def test_account_creation_is_limited_per_client_with_retry_after(host: DevhostProcess) -> None:
    assert [create(host, "203.0.113.10").status_code for _ in range(2)] == [201, 201]
    refused = create(host, "203.0.113.10")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_accounts"
    assert 1 <= int(refused.headers["Retry-After"]) <= 1800
    assert "Set-Cookie" not in refused.headers
    # Entries left of the client's are the client's own writing: forging them changes nothing.
    assert create(host, "198.51.100.1, 203.0.113.10").status_code == 429
    # Another client (as our proxy reports it) has its own allowance.
    assert create(host, "6.6.6.6, 203.0.113.11").status_code == 201


def test_imap_attempts_are_limited_per_client(host: DevhostProcess) -> None:
    closed = free_port()   # nothing listens: a quick refusal, no server involved
    imap = {"provider": "imap", "host": "127.0.0.1", "port": closed, "security": "tls",
            "username": "u@example.com", "password": "pw"}
    first = create(host, "203.0.113.20", imap)
    assert first.status_code == 400, first.text
    second = create(host, "203.0.113.20", imap)
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_imap_attempts"
    assert int(second.headers["Retry-After"]) >= 1
