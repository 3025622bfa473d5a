"""Per app + mailbox throttling over HTTP: concurrency (MailboxConcurrency) and request rate."""

from __future__ import annotations

import threading
import time

import requests

from tests.fixtures.graph_sandbox import SandboxTestServer


def wait_in_flight(sandbox: SandboxTestServer, count: int) -> None:
    """Block until the sandbox holds ``count`` requests in flight (a state, not a time)."""
    deadline = time.monotonic() + 60        # a guard against hanging, not an assertion on speed
    while sandbox.admin("GET", "throttle").json()["inFlight"] < count:
        assert time.monotonic() < deadline, "requests never overlapped"
        time.sleep(0.01)


def test_fifth_concurrent_request_gets_429_mailbox_concurrency(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=2, messages_per_user=10, latency_ms=1500)
    user, other = sandbox.users
    session = sandbox.graph()
    url = f"users/{user.id}/mailFolders/inbox/messages?$top=1"
    results: list[int] = []

    def call() -> None:
        results.append(sandbox.graph().get(url).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_in_flight(sandbox, 4)
    fifth = session.get(url)
    assert fifth.status_code == 429, fifth.text
    assert fifth.json()["error"]["code"] == "ApplicationThrottled"
    assert "MailboxConcurrency" in fifth.json()["error"]["message"]
    assert int(fifth.headers["Retry-After"]) >= 1
    # Another mailbox of the same app is not affected.
    assert session.get(f"users/{other.id}/mailFolders/inbox").status_code == 200
    for thread in threads:
        thread.join()
    assert results == [200, 200, 200, 200]
    assert session.get(url).status_code == 200         # slots are released
    counters = sandbox.admin("GET", "counters").json()
    assert counters["throttled"] == 1 and counters["byStatus"]["429"] == 1


def test_request_rate_limit_per_app_and_mailbox(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=2, messages_per_user=5)
    assert sandbox.admin("PATCH", "config", json={"rate_limit": "5/10m"}).status_code == 200
    user, other = sandbox.users
    session = sandbox.graph()
    statuses = [session.get(f"users/{user.id}/mailFolders/inbox").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    refused = session.get(f"users/{user.id}/mailFolders/inbox")
    assert refused.json()["error"]["code"] == "ApplicationThrottled"
    assert 1 <= int(refused.headers["Retry-After"]) <= 600
    assert session.get(f"users/{other.id}/mailFolders/inbox").status_code == 200
    # The window ends: requests flow again.
    sandbox.admin("POST", "clock", json={"advance_s": 601})
    sandbox._tokens.clear()                      # the jump expired the access token as well
    assert sandbox.graph().get(f"users/{user.id}/mailFolders/inbox").status_code == 200


def test_delegated_and_app_callers_are_throttled_per_mailbox(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=5, rate_limit_requests=3)
    user = sandbox.users[0]
    delegated = sandbox.graph(user)
    assert [delegated.get("me/mailFolders/inbox").status_code for _ in range(4)] == [200, 200, 200, 429]
    # Same app id (the demo app) and same mailbox: the app-only token shares the bucket.
    assert sandbox.graph().get(f"users/{user.id}/mailFolders/inbox").status_code == 429
    throttle = sandbox.admin("GET", "throttle").json()
    assert throttle["limit"] == 3 and throttle["buckets"][0]["windowCount"] == 3


def test_bad_rate_limit_setting_is_refused(graph_sandbox: SandboxTestServer) -> None:
    response = requests.patch(f"{graph_sandbox.base_url}/sandbox/config", json={"rate_limit": "lots"}, timeout=10)
    assert response.status_code == 400
    assert "rate limit" in response.json()["error"]["message"]
