"""An action reaches the user's other pages at once: PATCH / DELETE / bulk publish the optimistic rows.

A devhost with the three action functions and negotiate, and no sync
worker: the ACTION jobs stay on the queue, so whatever a second page hears
came from the API call itself, not from a job that reached the provider.
The second page is a SignalR client of the account (the devhost's Azure
SignalR emulation, the path the real page takes); another account's client
must hear nothing. The account and its rows are written straight into
Azurite and the store, as a sync would have left them.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import requests
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from mailsync.jobs import decode_job
from mailsync.linking.access import issue_access_token
from mailsync.models import Account, AccountStatus, Folder, Message, Provider
from mailsync.store.search_store import SearchStore
from tests.linking.tables import linking_tables
from tests.web.conftest import WebHost, web_host_fixture
from tests.web.test_negotiate import _connect, _next_invocation, negotiate

FUNCTIONS = ["message_update", "message_delete", "message_actions", "signalr_negotiate"]


web = web_host_fixture(FUNCTIONS)


@pytest.fixture(scope="module")
def store(web: WebHost) -> Iterator[SearchStore]:
    store = SearchStore.from_settings(web.settings)
    store.ensure_ready()
    try:
        yield store
    finally:
        store.close()


def _synced_account(web: WebHost, store: SearchStore) -> tuple[str, str]:
    """An Outlook account with an Inbox of three unread messages, an Archive and Deleted Items."""
    tables = linking_tables(web.settings)
    account_id = uuid.uuid4().hex
    token, token_hash = issue_access_token(account_id)
    now = datetime.now(UTC).replace(microsecond=0)
    tables.accounts.save(Account(account_id=account_id, provider=Provider.OUTLOOK, status=AccountStatus.SYNCED,
                                 access_token_hash=token_hash, created_at=now, updated_at=now))
    store.upsert_folders([Folder(account_id, "inbox", "Inbox", role="inbox"),
                          Folder(account_id, "archive", "Archive", role="archive"),
                          Folder(account_id, "trash", "Deleted Items", role="deleteditems")])
    store.upsert_messages([Message(account_id=account_id, message_id=f"m{i}", folder_id="inbox", version=1,
                                   subject=f"subject {i}", received_at=now - timedelta(minutes=i))
                           for i in range(3)])
    store.refresh()
    return account_id, token


def _call(web: WebHost, method: str, path: str, token: str, **kwargs: Any) -> dict[str, Any]:
    response = requests.request(method, f"{web.api}/{path}", headers={"Authorization": f"Bearer {token}"},
                                timeout=30, **kwargs)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def test_the_other_page_hears_each_action_before_its_job_ran(web: WebHost, store: SearchStore) -> None:
    account_id, token = _synced_account(web, store)
    other, other_token = _synced_account(web, store)
    info = negotiate(web, token).json()
    other_info = negotiate(web, other_token).json()
    base = f"accounts/{account_id}/messages"

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            page = await _connect(session, info)
            other_page = await _connect(session, other_info)
            loop = asyncio.get_running_loop()
            heard: list[dict[str, Any]] = []
            actions: list[tuple[str, str, dict[str, Any]]] = [
                ("PATCH", f"{base}/m0", {"json": {"is_read": True}}),
                ("PATCH", f"{base}/m1", {"json": {"folder_id": "archive"}}),
                ("DELETE", f"{base}/m2", {}),
                ("POST", f"{base}/actions", {"json": {"message_ids": ["m0", "m1"],
                                                      "action": {"flag_status": "flagged"}}}),
            ]
            for method, path, kwargs in actions:
                await loop.run_in_executor(None, functools.partial(_call, web, method, path, token, **kwargs))
                heard.append(await _next_invocation(page))
            # The other account's page: the first thing it hears is its own account's action, none of the above.
            await loop.run_in_executor(None, lambda: _call(web, "PATCH", f"accounts/{other}/messages/m0", other_token,
                                                           json={"is_read": True}))
            other_heard = await _next_invocation(other_page)
            await other_page.close()
            await page.close()
            return heard, other_heard

    # In a thread of its own: Playwright's sync API (other tests of the session) keeps a loop running.
    with ThreadPoolExecutor(max_workers=1) as pool:
        heard, other_heard = pool.submit(asyncio.run, scenario()).result(timeout=120)

    assert all(h["target"] == "messagesChanged" for h in heard)
    read, moved, trashed, flagged = (h["arguments"][0] for h in heard)
    assert all(p["account_id"] == account_id for p in (read, moved, trashed, flagged))
    assert [(r["message_id"], r["is_read"], r["folder_id"]) for r in read["upserted"]] == [("m0", True, "inbox")]
    assert [(r["message_id"], r["folder_id"]) for r in moved["upserted"]] == [("m1", "archive")]
    assert moved["removed"] == [{"folder_id": "inbox", "message_id": "m1"}]
    assert [(r["message_id"], r["folder_id"]) for r in trashed["upserted"]] == [("m2", "trash")]
    assert sorted((r["message_id"], r["flag_status"]) for r in flagged["upserted"]) == [
        ("m0", "flagged"), ("m1", "flagged")]
    assert other_heard["arguments"][0]["account_id"] == other
    # Every one of the five ACTION jobs is still waiting: no worker ran, the provider has none of it. Each
    # came with a WAKE through the function's queue output binding (mailsync.jobs.WakingJobQueue).
    queue = QueueClient.from_connection_string(web.env["AzureWebJobsStorage"], web.env["SYNC_QUEUE_NAME"],
                                               message_decode_policy=TextBase64DecodePolicy())
    kinds = sorted(decode_job(m.content).kind for m in queue.peek_messages(max_messages=32))
    assert kinds == ["action"] * 5 + ["wake"] * 5
