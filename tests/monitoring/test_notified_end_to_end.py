"""The page hears a change from the webhook before any delta round could show it; delta confirms it later.

The whole stack (devhost with every function, the Graph sandbox, Azurite,
the search node) with the sandbox's delta lag at ``DELTA_LAG_S``: for that
long after a change no delta round can read it, so an event that names the
new state sooner came from the notification's resource data
(mailsync.monitoring.notified_states).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import requests

from graph_sandbox.config import SandboxConfig
from mailsync.models import AccountStatus
from mailsync.providers.graph import notified_version
from tests.monitoring.test_end_to_end import Stack, running_stack, subscription_of
from tests.web.test_negotiate import _connect, _next_invocation

DELTA_LAG_S = 6.0
SIGNALR_KEY = "notified-tests-signalr-access-key-0123456789"


@pytest.fixture(scope="module")
def stack(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(
        SandboxConfig(seed=29, users=1, messages_per_user=30, delta_lag_s=DELTA_LAG_S), "notified", azurite,
        search_store_url, tmp_path_factory,
        # The devhost's SignalR service, so the page can connect (and the webhook tell it).
        AzureSignalRConnectionString=f"Endpoint=http://127.0.0.1:{{port}}/signalr;AccessKey={SIGNALR_KEY};Version=1.0;")


def test_the_page_hears_a_change_from_the_webhook_and_delta_confirms_it_later(stack: Stack) -> None:
    linked = stack.link(0)
    subscription_of(stack, linked)
    deadline = time.monotonic() + 60
    while stack.status(linked) != AccountStatus.SYNCED.value:
        assert time.monotonic() < deadline, "the initial sync did not finish"
        time.sleep(0.2)
    # The initial sync saw every message (the lag delays changes, not what was there); wait for its
    # sweep's look-agains to be over, so only the change below can produce an event.
    time.sleep(DELTA_LAG_S + 3)
    message = next(m for m in stack.sandbox.snapshot(linked.user)["messages"] if not m["isRead"])
    info = requests.post(f"{stack.api}/negotiate", headers={"Authorization": f"Bearer {linked.token}"},
                         timeout=30).json()

    async def scenario() -> tuple[float, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            page = await _connect(session, info)
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            answer = await loop.run_in_executor(None, lambda: stack.graph(linked).patch(
                f"me/messages/{message['id']}", json={"isRead": True}))
            assert answer.ok, answer.text
            while True:
                heard = await _next_invocation(page)
                rows = [r for r in heard["arguments"][0].get("upserted", []) if r["message_id"] == message["id"]]
                if heard["target"] == "messagesChanged" and rows:
                    await page.close()
                    return time.monotonic() - started, rows[0]

    with ThreadPoolExecutor(max_workers=1) as pool:
        took, row = pool.submit(asyncio.run, scenario()).result(timeout=60)
    assert took < DELTA_LAG_S / 2, f"the page heard it after {took:.1f} s: from a delta round, not the webhook"
    shown = stack.graph(linked).get(f"me/messages/{message['id']}", params={"$select": "lastModifiedDateTime"})
    modified = datetime.fromisoformat(shown.json()["lastModifiedDateTime"])
    assert row["is_read"] is True and row["version"] == notified_version(modified)
    stored = stack.store.get_message(linked.account_id, message["id"])
    assert stored is not None and stored.is_read and stored.version == notified_version(modified)

    # The NOTIFIED job's round reads delta once the lag is over: its reading of the same state replaces the copy.
    deadline = time.monotonic() + DELTA_LAG_S + 30
    while True:
        stored = stack.store.get_message(linked.account_id, message["id"])
        if stored is not None and stored.version > notified_version(modified):
            break
        assert time.monotonic() < deadline, "delta never confirmed the notified state"
        time.sleep(0.3)
    assert stored.is_read and stored.version < notified_version(modified) + 1000
    stack.wait_converged(linked, timeout_s=30)
