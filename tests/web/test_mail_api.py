"""The read API over HTTP: GET /api/accounts/{id}/mailboxes and /messages, GET /api/config.

One devhost per module (the linking, read and negotiate functions only),
Azurite for the accounts, the session's search store seeded directly with
two accounts' folders and messages — the same folder ids in both, so
account scoping is what keeps them apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from devhost.services.process import free_port
from mailsync.models import AccountStatus, Address, FlagStatus, Folder, Mailbox, Message, Provider
from mailsync.store.engines import connect
from mailsync.store.reads import encode_cursor
from mailsync.store.search_store import SearchStore, StoreOptions
from tests.web.conftest import WebHost, running_web_host

FUNCTIONS = ["oauth_start", "account_get", "mail_mailboxes", "mail_messages", "page_config"]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FOLDERS = [("f-archive", "Archive", "archive", None), ("f-inbox", "Inbox", "inbox", None),
           ("f-proj", "Projects", None, "f-inbox"), ("f-sent", "Sent Items", "sentitems", None)]


@dataclass
class Seeded:
    web: WebHost
    account_id: str
    token: str
    other_id: str
    other_token: str
    messages: list[Message]          # account A's, as seeded


def message(account_id: str, n: int, folder_id: str, *, read: bool, flagged: bool = False,
            subject: str | None = None) -> Message:
    return Message(
        account_id=account_id, message_id=f"m{n:03d}", folder_id=folder_id, version=1_000 + n,
        subject=subject or f"Message number {n}", sender=Address(f"sender{n % 4}@example.com", f"Sender {n % 4}"),
        received_at=T0 + timedelta(minutes=n), is_read=read,
        flag_status=FlagStatus.FLAGGED if flagged else FlagStatus.NOT_FLAGGED,
        body_preview=f"preview of {n}",
    )


def seed(store: SearchStore, account_id: str, count: int, *, offset: int = 0) -> list[Message]:
    store.upsert_folders([Folder(account_id, fid, name, parent, role, total_count=None, unread_count=None)
                          for fid, name, role, parent in FOLDERS], phase="incremental")
    store.upsert_mailbox(Mailbox(account_id, f"{account_id}@example.com", "Web Test", Provider.OUTLOOK,
                                 AccountStatus.SYNCED, total_messages=count))
    folders = ["f-inbox", "f-inbox", "f-proj", "f-sent", "f-archive"]
    messages = [message(account_id, offset + n, folders[n % 5], read=n % 3 == 0, flagged=n % 7 == 0,
                        subject="Quarterly budget review" if n in (4, 11, 25) else None)
                for n in range(count)]
    result = store.upsert_messages(messages)
    assert result.written == count and not result.failed_ids
    return messages


@pytest.fixture(scope="module")
def seeded(azurite: Any, search_store_url: str, graph_sandbox: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    with running_web_host(connection_string=azurite.connection_string, search_store_url=search_store_url,
                          sandbox_url=graph_sandbox.base_url, tmp_path_factory=tmp_path_factory,
                          functions=FUNCTIONS) as web:
        store = SearchStore(connect(search_store_url), StoreOptions(prefix=web.settings.index_prefix))
        try:
            store.ensure_ready()
            account_id, token = web.create_account()
            other_id, other_token = web.create_account()
            messages = seed(store, account_id, 40)
            seed(store, other_id, 7, offset=500)
            store.refresh()
            yield Seeded(web, account_id, token, other_id, other_token, messages)
        finally:
            store.close()


def all_pages(seeded: Seeded, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        answer = seeded.web.get(f"accounts/{seeded.account_id}/messages", seeded.token,
                                **params, **({"cursor": cursor} if cursor else {}))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        rows.extend(body["messages"])
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("paging did not end")


def newest_first(messages: list[Message]) -> list[str]:
    return [m.message_id for m in sorted(messages, key=lambda m: m.received_at or T0, reverse=True)]


def test_mailboxes_lists_folders_with_stored_counts_well_known_first(seeded: Seeded) -> None:
    answer = seeded.web.get(f"accounts/{seeded.account_id}/mailboxes", seeded.token)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json()
    assert body["account_id"] == seeded.account_id
    assert body["mailbox"]["address"] == f"{seeded.account_id}@example.com"
    assert [f["name"] for f in body["folders"]] == ["Inbox", "Sent Items", "Archive", "Projects"]
    by_id = {f["folder_id"]: f for f in body["folders"]}
    for folder_id in by_id:
        mine = [m for m in seeded.messages if m.folder_id == folder_id]
        assert by_id[folder_id]["stored_count"] == len(mine)
        assert by_id[folder_id]["stored_unread"] == sum(1 for m in mine if not m.is_read)
    assert by_id["f-proj"]["parent_id"] == "f-inbox" and by_id["f-inbox"]["role"] == "inbox"
    assert by_id["f-inbox"]["phase"] == "incremental"


def test_messages_newest_first_and_paging_covers_everything_once(seeded: Seeded) -> None:
    rows = all_pages(seeded, limit=7)
    assert [r["message_id"] for r in rows] == newest_first(seeded.messages)
    first = rows[0]
    newest = max(seeded.messages, key=lambda m: m.received_at or T0)
    assert first["subject"] == newest.subject
    assert first["sender"] == {"name": newest.sender.name, "address": newest.sender.address}  # type: ignore[union-attr]
    assert first["is_read"] == newest.is_read and first["flag_status"] == newest.flag_status.value
    assert first["received_at"] == "2026-03-01T12:39:00Z" and first["folder_id"] == newest.folder_id


def test_default_page_and_next_cursor(seeded: Seeded) -> None:
    body = seeded.web.get(f"accounts/{seeded.account_id}/messages", seeded.token).json()
    assert len(body["messages"]) == 40 and body["next_cursor"] is None
    body = seeded.web.get(f"accounts/{seeded.account_id}/messages", seeded.token, limit=40).json()
    assert body["next_cursor"] is None
    body = seeded.web.get(f"accounts/{seeded.account_id}/messages", seeded.token, limit=39).json()
    assert len(body["messages"]) == 39 and body["next_cursor"]


def test_filters_folder_unread_flagged_and_search(seeded: Seeded) -> None:
    inbox = all_pages(seeded, folder_id="f-inbox", limit=5)
    assert [r["message_id"] for r in inbox] == newest_first([m for m in seeded.messages if m.folder_id == "f-inbox"])
    unread = all_pages(seeded, unread="true")
    assert [r["message_id"] for r in unread] == newest_first([m for m in seeded.messages if not m.is_read])
    read_in_sent = all_pages(seeded, unread="false", folder_id="f-sent")
    assert [r["message_id"] for r in read_in_sent] == newest_first(
        [m for m in seeded.messages if m.is_read and m.folder_id == "f-sent"])
    flagged = all_pages(seeded, flagged="1")
    assert {r["message_id"] for r in flagged} == {m.message_id for m in seeded.messages
                                                  if m.flag_status is FlagStatus.FLAGGED}
    found = all_pages(seeded, q="budget")
    assert [r["message_id"] for r in found] == ["m025", "m011", "m004"]
    assert all_pages(seeded, folder_id="no-such-folder") == []


def test_accounts_are_kept_apart(seeded: Seeded) -> None:
    mine = {r["message_id"] for r in all_pages(seeded)}
    theirs = seeded.web.get(f"accounts/{seeded.other_id}/messages", seeded.other_token).json()["messages"]
    assert len(theirs) == 7 and not mine & {r["message_id"] for r in theirs}
    folders = seeded.web.get(f"accounts/{seeded.other_id}/mailboxes", seeded.other_token).json()["folders"]
    assert sum(f["stored_count"] for f in folders) == 7


@pytest.mark.parametrize("path", ["mailboxes", "messages"])
def test_tokens(seeded: Seeded, path: str) -> None:
    url = f"accounts/{seeded.account_id}/{path}"
    for token in (None, "", "not-a-token", f"{seeded.account_id}.wrong-secret", seeded.token + "x"):
        answer = seeded.web.get(url, token)
        assert answer.status_code == 401, (token, answer.text)
        assert answer.json()["error"]["code"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # Another account's valid token, and an id that does not exist: the same 404.
    assert seeded.web.get(url, seeded.other_token).status_code == 404
    assert seeded.web.get(f"accounts/nosuchaccount/{path}", seeded.token).status_code == 404
    assert seeded.web.get(f"accounts/nosuchaccount/{path}", seeded.token).json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(("params", "mentions"), [
    ({"limit": "0"}, "limit"),
    ({"limit": "201"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "-3"}, "limit"),
    ({"unread": "maybe"}, "unread"),
    ({"flagged": "yes please"}, "flagged"),
    ({"folder": "f-inbox"}, "folder"),
    ({"q": "x" * 501}, "q"),
    ({"q": "tab\there"}, "q"),
    ({"cursor": "definitely-not-ours"}, "cursor"),
    # Well-formed, but outside what the store can compare with (was a 500 quoting the store's query).
    ({"cursor": encode_cursor([2**70, "x"])}, "cursor"),
    ({"cursor": encode_cursor([-(2**64), "x"])}, "cursor"),
    ({"cursor": encode_cursor([1, "x" * 5000])}, "cursor"),
    ({"folder_id": "f" * 1025}, "folder_id"),
])
def test_bad_parameters_are_400_with_a_clear_error(seeded: Seeded, params: dict[str, str], mentions: str) -> None:
    answer = seeded.web.get(f"accounts/{seeded.account_id}/messages", seeded.token, **params)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] in ("invalid_parameter", "invalid_cursor")
    assert mentions in error["message"]


def test_bad_parameters_do_not_leak_before_authentication(seeded: Seeded) -> None:
    answer = seeded.web.get(f"accounts/{seeded.account_id}/messages", None, limit="0")
    assert answer.status_code == 401


def test_config_is_public_and_names_the_sandbox(seeded: Seeded) -> None:
    body = requests.get(f"{seeded.web.api}/config", timeout=10).json()
    sandbox = seeded.web.env["GRAPH_SANDBOX_URL"]
    assert body == {"sandbox": True, "sandbox_url": sandbox, "sandbox_mail_url": f"{sandbox}/sandbox/mail",
                    "provider": "outlook", "imap_allow_insecure": False}


def test_store_down_is_503_with_retry_after(azurite: Any, graph_sandbox: Any,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_web_host(connection_string=azurite.connection_string,
                          search_store_url=f"http://127.0.0.1:{free_port()}", sandbox_url=graph_sandbox.base_url,
                          tmp_path_factory=tmp_path_factory, functions=FUNCTIONS) as web:
        account_id, token = web.create_account()
        for path in ("mailboxes", "messages"):
            answer = web.get(f"accounts/{account_id}/{path}", token)
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["error"]["code"] in ("store_unavailable", "dependency_unavailable")
        assert web.get(f"accounts/{account_id}/messages", "bad-token").status_code == 401
