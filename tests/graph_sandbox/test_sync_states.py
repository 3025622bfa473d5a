"""Where Outlook's delta is less forgiving than a naive server: a small token cache, the
codes a lost sync state comes back with, lag, replays (graph_sandbox/sync_states.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.fixtures.graph_sandbox import GraphSession, SandboxTestServer

INBOX_DELTA = "me/mailFolders/inbox/messages/delta"


def get(session: GraphSession, url: str, size: int = 5) -> dict[str, Any]:
    response = session.get(url, headers={"Prefer": f'IdType="ImmutableId", odata.maxpagesize={size}'})
    assert response.status_code == 200, response.text
    return response.json()


def next_links(session: GraphSession, count: int) -> list[str]:
    """The nextLinks of the first ``count`` pages of an Inbox round, oldest first."""
    links: list[str] = []
    url = INBOX_DELTA
    for _ in range(count):
        url = get(session, url)["@odata.nextLink"]
        links.append(url)
    return links


def test_links_older_than_the_cache_answer_sync_state_not_found(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=80, delta_lag_s=0.0, delta_replay_rate=0.0)
    session = sandbox.graph(sandbox.users[0])
    links = next_links(session, 5)            # generations 1..5; the cache keeps 5, 4, 3
    gone = session.get(links[1])
    assert gone.status_code == 410
    error = gone.json()["error"]
    assert error["code"] == "SyncStateNotFound"
    assert error["message"] == ("The sync state generation is not found; generation=2;"
                                "[highest=5][5][4][3].")
    assert session.get(links[2]).status_code == 200   # the oldest one still cached (it issues generation 6)
    assert session.get(links[3]).status_code == 200
    assert session.get(links[2]).status_code == 410   # now 7, 6, 5 are kept
    assert sandbox.admin("GET", "counters").json()["deltaExpired"] == 2


def test_the_cache_size_and_the_status_are_configurable(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=80, delta_lag_s=0.0, delta_replay_rate=0.0,
                              delta_expired_status=400)
    session = sandbox.graph(sandbox.users[0])
    links = next_links(session, 5)
    gone = session.get(links[0])
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "SyncStateNotFound"
    assert sandbox.admin("PATCH", "config", json={"delta_token_cache": 0}).status_code == 200
    assert session.get(links[0]).status_code == 200     # cache off: every link is honoured
    assert sandbox.admin("PATCH", "config", json={"delta_token_cache": -1}).status_code == 400


def test_a_link_used_with_another_id_type_is_an_invalid_sync_state(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=30, delta_lag_s=0.0, delta_replay_rate=0.0)
    user = sandbox.users[0]
    link = get(sandbox.graph(user), INBOX_DELTA)["@odata.nextLink"]
    rest_ids = sandbox.graph(user, immutable=False)
    answer = rest_ids.get(link, headers={"Prefer": "odata.maxpagesize=5"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "SyncStateInvalid"


def test_a_fresh_round_after_a_lost_state_counts_as_a_full_restart(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=80, delta_lag_s=0.0, delta_replay_rate=0.0)
    session = sandbox.graph(sandbox.users[0])
    links = next_links(session, 4)
    get(session, INBOX_DELTA)                      # starting over by choice is no forced restart
    assert sandbox.admin("GET", "counters").json()["deltaRestarts"] == 0
    assert session.get(links[0]).status_code == 410
    get(session, "me/mailFolders/sentitems/messages/delta")
    assert sandbox.admin("GET", "counters").json()["deltaRestarts"] == 0
    get(session, INBOX_DELTA)
    counters = sandbox.admin("GET", "counters").json()
    assert (counters["deltaRestarts"], counters["deltaExpired"]) == (1, 1)


def finish(session: GraphSession, url: str) -> tuple[list[dict[str, Any]], str]:
    items: list[dict[str, Any]] = []
    while True:
        body = get(session, url, size=50)
        items += body["value"]
        if "@odata.deltaLink" in body:
            return items, body["@odata.deltaLink"]
        url = body["@odata.nextLink"]


def test_a_change_shows_in_delta_only_after_the_lag(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=30, delta_lag_s=30.0, delta_replay_rate=0.0)
    user = sandbox.users[0]
    session = sandbox.graph(user)
    _, delta_link = finish(session, INBOX_DELTA)      # the seeded mailbox is old enough to be seen at once
    snapshot = sandbox.snapshot(user)
    inbox = next(f["id"] for f in snapshot["folders"] if f["wellKnownName"] == "inbox")
    message = next(m for m in snapshot["messages"] if m["folderId"] == inbox)
    assert session.patch(f"me/messages/{message['id']}", json={"isRead": not message["isRead"]}).status_code == 200
    seen, delta_link = finish(session, delta_link)
    assert seen == []                                  # made, notified, but not in delta yet
    sandbox.admin("POST", "clock", json={"advance_s": 31})
    seen, _ = finish(session, delta_link)
    assert [(m["id"], m["isRead"]) for m in seen] == [(message["id"], not message["isRead"])]


def test_replayed_items_come_again_on_the_next_page(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=60, delta_lag_s=0.0, delta_replay_rate=1.0)
    session = sandbox.graph(sandbox.users[0])
    first = get(session, INBOX_DELTA, size=6)
    second = get(session, first["@odata.nextLink"], size=6)
    ids = [m["id"] for m in first["value"]]
    assert ids[3:] == [m["id"] for m in second["value"]][:3]


# --- search folders -----------------------------------------------------------------------------

def test_seeded_search_folder_is_listed_as_a_mail_search_folder(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=60, search_folders=2)
    user = sandbox.users[0]
    session = sandbox.graph(user)
    snapshot = sandbox.snapshot(user)
    assert [f["displayName"] for f in snapshot["searchFolders"]] == ["Unread Mail", "Flagged Mail"]
    top = session.get("me/mailFolders?$top=100").json()["value"]
    unread = next(f for f in top if f["displayName"] == "Unread Mail")
    assert unread["@odata.type"] == "#microsoft.graph.mailSearchFolder"
    assert unread["filterQuery"] == "isRead eq false" and unread["includeNestedFolders"] is True
    # Plain folders carry no annotation in a mailFolder collection (OData minimal metadata).
    assert all("@odata.type" not in f for f in top if f["displayName"] not in ("Unread Mail", "Flagged Mail"))
    inbox_tree = {next(f["id"] for f in snapshot["folders"] if f["wellKnownName"] == "inbox")}
    while grown := {f["id"] for f in snapshot["folders"] if f["parentFolderId"] in inbox_tree} - inbox_tree:
        inbox_tree |= grown
    expected = {m["id"] for m in snapshot["messages"] if not m["isRead"] and m["folderId"] in inbox_tree}
    listed = session.get(f"me/mailFolders/{unread['id']}/messages?$top=1000&$select=id,parentFolderId").json()
    assert {m["id"] for m in listed["value"]} == expected
    # Same messages, same ids, living elsewhere: parentFolderId is their real folder.
    assert all(m["parentFolderId"] in inbox_tree for m in listed["value"])
    assert unread["totalItemCount"] == len(expected)


def test_create_a_search_folder_and_page_its_delta(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=60, search_folders=0, delta_lag_s=0.0,
                              delta_replay_rate=0.0)
    user = sandbox.users[0]
    session = sandbox.graph(user)
    refused = session.post("me/mailFolders/msgfolderroot/childFolders", json={
        "displayName": "Flagged", "includeNestedFolders": True, "sourceFolderIds": ["inbox"]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "RequestBodyRead"
    created = session.post("me/mailFolders/msgfolderroot/childFolders", json={
        "@odata.type": "microsoft.graph.mailSearchFolder", "displayName": "Flagged",
        "includeNestedFolders": False, "sourceFolderIds": ["inbox"],
        "filterQuery": "flag/flagStatus eq 'flagged'"})
    assert created.status_code == 201, created.text
    folder = created.json()
    assert folder["@odata.type"] == "#microsoft.graph.mailSearchFolder" and folder["totalItemCount"] == 0
    inbox = session.get("me/mailFolders/inbox").json()["id"]
    assert folder["sourceFolderIds"] == [inbox]
    message = session.get("me/mailFolders/inbox/messages?$top=1").json()["value"][0]
    delta = f"me/mailFolders/{folder['id']}/messages/delta"
    seen, delta_link = finish(session, delta)
    assert seen == []
    session.patch(f"me/messages/{message['id']}", json={"flag": {"flagStatus": "flagged"}})
    seen, delta_link = finish(session, delta_link)
    assert [(m["id"], m["parentFolderId"]) for m in seen] == [(message["id"], inbox)]
    # Nothing can be put into a view.
    moved = session.post(f"me/messages/{message['id']}/move", json={"destinationId": folder["id"]})
    assert moved.status_code == 400
    session.patch(f"me/messages/{message['id']}", json={"flag": {"flagStatus": "notFlagged"}})
    seen, _ = finish(session, delta_link)
    assert [m["id"] for m in seen if "@removed" in m] == [message["id"]]
    # Deleting a search folder deletes no mail.
    assert session.delete(f"me/mailFolders/{folder['id']}").status_code == 204
    assert session.get(f"me/messages/{message['id']}").status_code == 200


def test_an_unused_search_folder_expires(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=30, search_folders=1, delta_lag_s=0.0,
                              delta_replay_rate=0.0)
    user = sandbox.users[0]
    session = sandbox.graph(user)
    folders, delta_link = [], "me/mailFolders/delta"
    while True:
        body = get(session, delta_link, size=50)
        folders += body["value"]
        if "@odata.deltaLink" in body:
            delta_link = body["@odata.deltaLink"]
            break
        delta_link = body["@odata.nextLink"]
    search = next(f for f in folders if f["@odata.type"] == "#microsoft.graph.mailSearchFolder")
    messages_before = sandbox.snapshot(user)["messageCount"]
    # 45 days in Exchange; a second here.
    assert sandbox.admin("PATCH", "config", json={"search_folder_idle_days": 1 / 86_400}).status_code == 200
    time.sleep(1.2)
    changes = get(session, delta_link, size=50)["value"]
    assert changes == [{"@odata.type": "#microsoft.graph.mailFolder", "id": search["id"],
                        "@removed": {"reason": "deleted"}}]
    assert sandbox.snapshot(user)["searchFolders"] == []
    assert sandbox.snapshot(user)["messageCount"] == messages_before


@pytest.mark.parametrize("body", [
    {"displayName": "x", "sourceFolderIds": []},
    {"displayName": "x", "sourceFolderIds": ["inbox"], "includeNestedFolders": "yes"},
    {"displayName": "x", "sourceFolderIds": ["inbox"], "filterQuery": "subject eq 'a'"},
    {"displayName": "x", "sourceFolderIds": ["no-such-folder"]},
])
def test_bad_search_folders_are_refused(graph_sandbox: SandboxTestServer, body: dict[str, Any]) -> None:
    session = graph_sandbox.graph(graph_sandbox.users[1])
    answer = session.post("me/mailFolders", json={"@odata.type": "#microsoft.graph.mailSearchFolder", **body})
    assert 400 <= answer.status_code < 500 and answer.json()["error"]["code"]
