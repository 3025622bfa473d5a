"""The /sandbox/mail page over HTTP: what a person clicks shows up in Graph, delta and snapshots."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from graph_sandbox.config import SandboxConfig
from graph_sandbox.server import SandboxServer
from tests.graph_sandbox.signin import user_tokens


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    sandbox = SandboxServer(SandboxConfig(users=2, messages_per_user=30, delta_lag_s=0.0, delta_replay_rate=0.0))
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def url(server: SandboxServer) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def users(server: SandboxServer) -> list[Any]:
    return sorted(server.state.users.values(), key=lambda u: u.mail)


@pytest.fixture(scope="module")
def token(url: str, users: list[Any]) -> str:
    return str(user_tokens(url, users[0].mail)[0]["access_token"])


def snapshot(url: str, user: Any) -> dict[str, Any]:
    response = requests.get(f"{url}/sandbox/mailboxes/{user.id}/snapshot", timeout=10)
    assert response.status_code == 200
    return dict(response.json())


def folder_id(snap: dict[str, Any], well_known: str) -> str:
    return next(f["id"] for f in snap["folders"] if f["wellKnownName"] == well_known)


def in_folder(snap: dict[str, Any], fid: str) -> list[dict[str, Any]]:
    return [m for m in snap["messages"] if m["folderId"] == fid]


def act(url: str, user: Any, folder: str, message: str, action: str, **extra: str) -> str:
    """Press a button on the page; return the page it redirects to."""
    response = requests.post(f"{url}/sandbox/mail/action", allow_redirects=False, timeout=10,
                             data={"user": user.id, "folder": folder, "message": message, "action": action, **extra})
    assert response.status_code == 303, response.text
    location = response.headers["Location"]
    assert location.startswith("/sandbox/mail?")
    page = requests.get(url + location, timeout=10)
    assert page.status_code == 200
    return page.text


def notice(page: str) -> str:
    match = re.search(r"<p class='(notice|error)'[^>]*>(.*?)</p>", page)
    return html.unescape(match.group(2)) if match else ""


def graph(url: str, token: str, path: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    return requests.request(kwargs.pop("method", "GET"), f"{url}/v1.0/{path}", headers=headers, timeout=10,
                            **kwargs)


def delta_round(url: str, token: str, link: str) -> tuple[list[dict[str, Any]], str]:
    """Follow nextLinks to the deltaLink; return (items, deltaLink)."""
    items: list[dict[str, Any]] = []
    while True:
        page = requests.get(link, headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        items.extend(page["value"])
        if "@odata.deltaLink" in page:
            return items, page["@odata.deltaLink"]
        link = page["@odata.nextLink"]


def test_page_shows_folders_and_the_newest_inbox_messages(url: str, users: list[Any]) -> None:
    page = requests.get(f"{url}/sandbox/mail", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    snap = snapshot(url, users[0])
    for name in ("Inbox", "Sent Items", "Deleted Items", "Archive"):
        assert f">{name}</a>" in page.text
    inbox = in_folder(snap, folder_id(snap, "inbox"))
    for message in inbox[:5]:   # newest first, as the snapshot lists them
        assert html.escape(message["subject"], quote=True) in page.text
    assert users[0].mail in page.text and users[1].mail in page.text


def test_each_user_has_a_page(url: str, users: list[Any]) -> None:
    snap = snapshot(url, users[1])
    inbox = in_folder(snap, folder_id(snap, "inbox"))
    page = requests.get(f"{url}/sandbox/mail", params={"user": users[1].mail}, timeout=10)
    assert html.escape(inbox[0]["subject"], quote=True) in page.text
    assert requests.get(f"{url}/sandbox/mail", params={"user": "nobody@example.com"}, timeout=10).status_code == 404


def test_opening_a_message_shows_its_body_without_changing_it(url: str, users: list[Any]) -> None:
    snap = snapshot(url, users[0])
    message = in_folder(snap, folder_id(snap, "inbox"))[0]
    page = requests.get(f"{url}/sandbox/mail", params={"user": users[0].id, "message": message["restId"]},
                        timeout=10)
    assert "<article>" in page.text and "srcdoc=" in page.text
    assert snapshot(url, users[0])["messages"] == snap["messages"]


def test_mark_read_and_flag_are_graph_changes_seen_by_delta(url: str, users: list[Any], token: str) -> None:
    user = users[0]
    _, link = delta_round(url, token, f"{url}/v1.0/me/mailFolders/inbox/messages/delta")
    snap = snapshot(url, user)
    inbox = folder_id(snap, "inbox")
    message = next(m for m in in_folder(snap, inbox) if not m["isRead"] and m["flagStatus"] == "notFlagged")

    assert notice(act(url, user, inbox, message["restId"], "read")).startswith("Marked read")
    assert notice(act(url, user, inbox, message["restId"], "flag")).startswith("Marked flag")

    seen = graph(url, token, f"me/messages/{message['restId']}").json()
    assert seen["isRead"] is True
    assert seen["flag"]["flagStatus"] == "flagged" and "dueDateTime" in seen["flag"]  # as a Graph PATCH sets it
    changed, _ = delta_round(url, token, link)
    assert [(m["id"], m.get("isRead")) for m in changed] == [(message["restId"], True)]

    assert notice(act(url, user, inbox, message["restId"], "unread")).startswith("Marked unread")
    assert notice(act(url, user, inbox, message["restId"], "unflag")).startswith("Marked unflag")
    again = graph(url, token, f"me/messages/{message['restId']}").json()
    assert again["isRead"] is False and again["flag"] == {"flagStatus": "notFlagged"}


def test_move_and_delete_behave_like_graph(url: str, users: list[Any], token: str) -> None:
    user = users[0]
    _, link = delta_round(url, token, f"{url}/v1.0/me/mailFolders/inbox/messages/delta")
    snap = snapshot(url, user)
    inbox, archive, trash = folder_id(snap, "inbox"), folder_id(snap, "archive"), folder_id(snap, "deleteditems")
    first, second = in_folder(snap, inbox)[:2]

    assert notice(act(url, user, inbox, first["restId"], "move", destination=archive)).startswith("Moved to Archive")
    assert notice(act(url, user, inbox, second["restId"], "delete")).startswith("Deleted")

    after = {m["id"]: m for m in snapshot(url, user)["messages"]}
    assert after[first["id"]]["folderId"] == archive and after[first["id"]]["restId"] != first["restId"]
    assert after[second["id"]]["folderId"] == trash
    assert graph(url, token, f"me/messages/{first['restId']}").status_code == 404   # old REST id is gone
    removed, _ = delta_round(url, token, link)
    assert {m["id"] for m in removed if "@removed" in m} == {first["restId"], second["restId"]}


def test_send_delivers_to_a_sandbox_recipient(url: str, users: list[Any]) -> None:
    sender, recipient = users
    response = requests.post(f"{url}/sandbox/mail/send", allow_redirects=False, timeout=10, data={
        "user": sender.id, "to": recipient.mail, "subject": "Lunch on Friday?", "body": "Noon at the usual place."})
    assert response.status_code == 303
    assert notice(requests.get(url + response.headers["Location"], timeout=10).text) == "Sent: Lunch on Friday?"
    theirs = snapshot(url, recipient)
    got = [m for m in in_folder(theirs, folder_id(theirs, "inbox")) if m["subject"] == "Lunch on Friday?"]
    assert len(got) == 1 and got[0]["isRead"] is False and got[0]["from"]["address"] == sender.mail
    mine = snapshot(url, sender)
    assert any(m["subject"] == "Lunch on Friday?" for m in in_folder(mine, folder_id(mine, "sentitems")))


@pytest.mark.parametrize(("form", "error"), [
    ({"to": "", "subject": "x"}, "ErrorInvalidRecipients"),
    ({"to": "not-an-address", "subject": "x"}, "ErrorInvalidRecipients"),
])
def test_send_refuses_bad_recipients_and_keeps_nothing(url: str, users: list[Any], form: dict[str, str],
                                                       error: str) -> None:
    before = snapshot(url, users[0])["messageCount"]
    response = requests.post(f"{url}/sandbox/mail/send", data={"user": users[0].id, **form}, allow_redirects=False,
                             timeout=10)
    assert response.status_code == 303
    page = requests.get(url + response.headers["Location"], timeout=10).text
    assert notice(page).startswith(error)
    assert snapshot(url, users[0])["messageCount"] == before


def test_actions_on_a_message_that_is_gone_say_so(url: str, users: list[Any]) -> None:
    snap = snapshot(url, users[0])
    inbox = folder_id(snap, "inbox")
    page = act(url, users[0], inbox, "AAMkAGdoesnotexist", "read")
    assert notice(page).startswith("ErrorItemNotFound")
    message = in_folder(snap, inbox)[0]
    assert notice(act(url, users[0], inbox, message["restId"], "explode")) == "Unknown action 'explode'."


def test_subjects_are_escaped(url: str, users: list[Any]) -> None:
    subject = "<script>alert('x')</script> & <b>bold</b>"
    sender = user_tokens(url, users[1].mail, scope="Mail.Send offline_access openid profile")[0]["access_token"]
    response = graph(url, sender, "me/sendMail", method="POST", json={"message": {
        "subject": subject, "body": {"contentType": "text", "content": "hi"},
        "toRecipients": [{"emailAddress": {"address": users[0].mail}}]}})
    assert response.status_code == 202, response.text
    page = requests.get(f"{url}/sandbox/mail", params={"user": users[0].id}, timeout=10).text
    assert "<script>alert" not in page
    assert html.escape(subject, quote=True) in page


def test_paging_through_a_large_folder(url: str, users: list[Any]) -> None:
    requests.post(f"{url}/sandbox/mailboxes/{users[1].id}/deliver", json={"count": 60}, timeout=10).raise_for_status()
    page = requests.get(f"{url}/sandbox/mail", params={"user": users[1].id}, timeout=10).text
    older = re.search(r"href='([^']*page=2[^']*)'>Older", page)
    assert older is not None
    query = parse_qs(urlsplit(html.unescape(older.group(1))).query)
    assert query["page"] == ["2"]
    second = requests.get(f"{url}/sandbox/mail", params={k: v[0] for k, v in query.items()}, timeout=10).text
    assert "page 2 of" in second and "Newer" in second
