"""Delta query over HTTP: rounds, pages, changes while paging, moves, expiry, folder delta."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.fixtures.graph_sandbox import GraphSession, SandboxTestServer


def page(session: GraphSession, url: str, size: int | None = None) -> dict[str, Any]:
    prefer = [p for p in (session.headers.get("Prefer"), size and f"odata.maxpagesize={size}") if p]
    headers = {"Prefer": ", ".join(prefer)} if prefer else {}
    response = session.get(url, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def run_round(session: GraphSession, url: str, size: int = 7) -> tuple[list[dict[str, Any]], str]:
    """Follow nextLinks to the deltaLink: (every item, deltaLink)."""
    items: list[dict[str, Any]] = []
    while True:
        body = page(session, url, size)
        assert ("@odata.nextLink" in body) != ("@odata.deltaLink" in body)
        items += body["value"]
        if "@odata.deltaLink" in body:
            return items, body["@odata.deltaLink"]
        url = body["@odata.nextLink"]


def apply(local: dict[str, dict[str, Any]], items: list[dict[str, Any]]) -> None:
    """What a sync engine does with a delta page: upsert by id, drop @removed."""
    for item in items:
        if "@removed" in item:
            assert item["@removed"] == {"reason": "deleted"}
            local.pop(item["id"], None)
        else:
            local[item["id"]] = item


def truth(server: SandboxTestServer, user: Any, folder_id: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in server.snapshot(user)["messages"] if m["folderId"] == folder_id}


def assert_mirrors(local: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert set(local) == set(expected)
    for mid, message in expected.items():
        got = local[mid]
        assert (got["isRead"], got["subject"], got["flag"]["flagStatus"]) == (
            message["isRead"], message["subject"], message["flagStatus"]), mid


DELTA = "me/mailFolders/{}/messages/delta"


@pytest.fixture
def sandbox(sandbox_factory) -> SandboxTestServer:
    # Delta's exact round semantics: without lag and replays (tests/graph_sandbox/test_sync_states.py has those).
    return sandbox_factory(users=2, messages_per_user=120, delta_lag_s=0.0, delta_replay_rate=0.0)


def test_initial_round_pages_then_delta_link_then_only_changes(sandbox: SandboxTestServer) -> None:
    user = sandbox.users[0]
    session = sandbox.graph(user)
    inbox = session.get("me/mailFolders/inbox").json()
    first = page(session, DELTA.format("inbox"), 4)
    assert len(first["value"]) == 4 and "@odata.nextLink" in first
    assert all(item["@odata.type"] == "#microsoft.graph.message" for item in first["value"])
    items, delta_link = run_round(session, DELTA.format("inbox"))
    assert len(items) == inbox["totalItemCount"] == len({i["id"] for i in items})
    assert not any("@removed" in i for i in items)

    # A round with no changes is empty and hands back a deltaLink.
    again, delta_link = run_round(session, delta_link)
    assert again == []
    target = items[3]["id"]
    assert session.patch(f"me/messages/{target}", json={"isRead": not items[3]["isRead"]}).status_code == 200
    changed, _ = run_round(session, delta_link)
    assert [c["id"] for c in changed] == [target] and changed[0]["isRead"] is (not items[3]["isRead"])


def test_default_page_is_10_and_maxpagesize_is_capped(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    response = session.get(DELTA.format("inbox"))
    assert len(response.json()["value"]) == 10
    assert "odata.maxpagesize=10" in response.headers["Preference-Applied"]
    big = session.get(DELTA.format("inbox"), headers={"Prefer": "odata.maxpagesize=5000"})
    assert "odata.maxpagesize=500" in big.headers["Preference-Applied"]


def test_top_ends_the_round_after_that_many_items(sandbox: SandboxTestServer) -> None:
    # Outlook: $top on delta is not a page size. The round stops after $top items;
    # the rest of the folder is in neither this round nor the next (unless it changes).
    session = sandbox.graph(sandbox.users[0])
    inbox = session.get("me/mailFolders/inbox").json()
    assert inbox["totalItemCount"] > 8
    items, delta_link = run_round(session, DELTA.format("inbox") + "?$top=5", size=3)
    assert len(items) == 5 == len({i["id"] for i in items})
    again, delta_link = run_round(session, delta_link)
    assert again == []
    target = items[0]["id"]
    assert session.patch(f"me/messages/{target}", json={"isRead": not items[0]["isRead"]}).status_code == 200
    changed, _ = run_round(session, delta_link)
    assert [c["id"] for c in changed] == [target]
    # Paged with Prefer: odata.maxpagesize instead, the round has every message.
    full, _ = run_round(session, DELTA.format("inbox"), size=3)
    assert len(full) == inbox["totalItemCount"]


def test_select_is_kept_across_the_round(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    items, delta_link = run_round(session, DELTA.format("inbox") + "?$select=subject,isRead", size=5)
    assert {frozenset(i) for i in items} == {frozenset({"@odata.type", "@odata.etag", "id", "subject", "isRead"})}
    first = items[0]["id"]
    session.patch(f"me/messages/{first}", json={"flag": {"flagStatus": "flagged"}})
    changed, _ = run_round(session, delta_link)
    assert set(changed[0]) == {"@odata.type", "@odata.etag", "id", "subject", "isRead"}


def test_changes_made_while_paging_are_never_lost(sandbox: SandboxTestServer) -> None:
    """Mark read, flag, move out, move in, delete and deliver between pages: two rounds converge."""
    user = sandbox.users[0]
    session = sandbox.graph(user)
    inbox_id = session.get("me/mailFolders/inbox").json()["id"]
    local: dict[str, dict[str, Any]] = {}
    body = page(session, DELTA.format("inbox"), 5)
    apply(local, body["value"])
    seen = list(local)
    all_inbox = list(truth(sandbox, user, inbox_id))
    unseen = [m for m in all_inbox if m not in local]
    # Changes to messages already sent and to messages not sent yet.
    session.patch(f"me/messages/{seen[0]}", json={"isRead": True})
    session.patch(f"me/messages/{unseen[0]}", json={"flag": {"flagStatus": "flagged"}})
    session.post(f"me/messages/{seen[1]}/move", json={"destinationId": "archive"})
    session.post(f"me/messages/{unseen[1]}/move", json={"destinationId": "archive"})
    session.delete(f"me/messages/{unseen[2]}")
    archived = session.get("me/mailFolders/archive/messages?$top=1").json()["value"][0]["id"]
    session.post(f"me/messages/{archived}/move", json={"destinationId": "inbox"})
    assert sandbox.admin("POST", f"mailboxes/{user.id}/deliver", json={"count": 3, "seed": 5}).status_code == 200
    url = body["@odata.nextLink"]
    while True:
        body = page(session, url, 5)
        apply(local, body["value"])
        # More changes on every page, to land behind and ahead of the cursor.
        session.patch(f"me/messages/{unseen[-1]}", json={"isRead": len(local) % 2 == 0})
        if "@odata.deltaLink" in body:
            break
        url = body["@odata.nextLink"]
    items, _ = run_round(session, body["@odata.deltaLink"], size=5)
    apply(local, items)
    assert_mirrors(local, truth(sandbox, user, inbox_id))


def test_a_move_is_removed_from_the_source_and_added_to_the_target(sandbox: SandboxTestServer) -> None:
    user = sandbox.users[0]
    for immutable in (True, False):
        session = sandbox.graph(user, immutable=immutable)
        _, inbox_link = run_round(session, DELTA.format("inbox"), size=50)
        _, archive_link = run_round(session, DELTA.format("archive"), size=50)
        message = session.get("me/mailFolders/inbox/messages?$top=1").json()["value"][0]
        moved = session.post(f"me/messages/{message['id']}/move", json={"destinationId": "archive"}).json()
        source, _ = run_round(session, inbox_link)
        target, _ = run_round(session, archive_link)
        assert source == [{"@odata.type": "#microsoft.graph.message", "id": message["id"],
                           "@removed": {"reason": "deleted"}}]
        assert [t["id"] for t in target] == [moved["id"]]
        assert (moved["id"] == message["id"]) is immutable


def test_expired_state_mid_sync_is_410_and_a_fresh_round_recovers(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=60, delta_token_ttl_s=120, delta_lag_s=0.0,
                              delta_replay_rate=0.0)
    session = sandbox.graph(sandbox.users[0])
    body = page(session, DELTA.format("inbox"), 5)
    assert sandbox.admin("POST", "clock", json={"advance_s": 180}).status_code == 200
    expired = session.get(body["@odata.nextLink"])
    assert expired.status_code == 410, expired.text
    assert expired.json()["error"]["code"] == "SyncStateNotFound"
    items, _ = run_round(session, DELTA.format("inbox"))
    assert len(items) == session.get("me/mailFolders/inbox").json()["totalItemCount"]


def test_invalidated_state_is_410_resync_required(sandbox: SandboxTestServer) -> None:
    user = sandbox.users[0]
    session = sandbox.graph(user)
    _, delta_link = run_round(session, DELTA.format("inbox"), size=100)
    assert sandbox.admin("POST", f"users/{user.mail}/invalidate-delta").status_code == 200
    response = session.get(delta_link)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "resyncRequired"


def test_tampered_or_foreign_tokens_are_refused(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    body = page(session, DELTA.format("inbox"), 5)
    link = body["@odata.nextLink"]
    token = link.split("$skiptoken=")[1]
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    response = session.get(link.replace(token, tampered))
    assert response.status_code == 400 and response.json()["error"]["code"] == "ErrorInvalidSyncStateData"
    # A token of the Inbox used on Archive.
    archive = session.get("me/mailFolders/archive").json()["id"]
    response = session.get(f"me/mailFolders/{archive}/messages/delta?$skiptoken={token}")
    assert response.status_code == 400


def test_change_type_filter_in_later_rounds(sandbox: SandboxTestServer) -> None:
    user = sandbox.users[0]
    session = sandbox.graph(user)
    items, delta_link = run_round(session, DELTA.format("inbox") + "?changeType=created", size=100)
    session.patch(f"me/messages/{items[0]['id']}", json={"isRead": not items[0]["isRead"]})
    delivered = sandbox.admin("POST", f"mailboxes/{user.id}/deliver", json={"count": 2, "seed": 9}).json()
    created, _ = run_round(session, delta_link)
    assert sorted(c["id"] for c in created) == sorted(d["id"] for d in delivered["delivered"])


def test_received_filter_and_newest_first_order(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    everything, _ = run_round(session, DELTA.format("inbox") + "?$orderby=receivedDateTime desc", size=6)
    times = [i["receivedDateTime"] for i in everything]
    assert times == sorted(times, reverse=True)
    assert len(everything) == session.get("me/mailFolders/inbox").json()["totalItemCount"]
    cutoff = times[len(times) // 3]
    recent, _ = run_round(session, DELTA.format("inbox") + f"?$filter=receivedDateTime ge {cutoff}", size=6)
    assert sorted(r["id"] for r in recent) == sorted(i["id"] for i in everything if i["receivedDateTime"] >= cutoff)
    bad = session.get(DELTA.format("inbox") + "?$filter=isRead eq true")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "ErrorInvalidUrlQueryFilter"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_changes_between_pages_converge(sandbox: SandboxTestServer, seed: int) -> None:
    """Random churn (read, flag, move, delete, new mail) interleaved with paging, on every folder."""
    user = sandbox.users[1]
    session = sandbox.graph(user)
    rng = random.Random(seed)
    folders = [f["id"] for f in sandbox.snapshot(user)["folders"]]
    local = {fid: {} for fid in folders}
    links = {fid: DELTA.format(fid) for fid in folders}
    for _ in range(3):                       # rounds
        for fid in folders:
            url = links[fid]
            while True:
                body = page(session, url, rng.choice((3, 10)))
                apply(local[fid], body["value"])
                churn = sandbox.admin("POST", f"mailboxes/{user.id}/churn",
                                      json={"operations": rng.randint(0, 3), "seed": rng.getrandbits(32)})
                assert churn.status_code == 200, churn.text
                if "@odata.deltaLink" in body:
                    links[fid] = body["@odata.deltaLink"]
                    break
                url = body["@odata.nextLink"]
    for fid in folders:                      # a last quiet round per folder
        items, _ = run_round(session, links[fid])
        apply(local[fid], items)
        assert_mirrors(local[fid], truth(sandbox, user, fid))


def test_folder_delta_reports_created_renamed_and_removed_folders(sandbox: SandboxTestServer) -> None:
    user = sandbox.users[0]
    session = sandbox.graph(user)
    folders, delta_link = run_round(session, "me/mailFolders/delta", size=4)
    snapshot = sandbox.snapshot(user)
    searches = {f["id"] for f in snapshot["searchFolders"]}
    # Nested folders too, and search folders, which say what they are.
    assert sorted(f["id"] for f in folders) == sorted([*(f["id"] for f in snapshot["folders"]), *searches])
    assert all(f["@odata.type"] == ("#microsoft.graph.mailSearchFolder" if f["id"] in searches
                                    else "#microsoft.graph.mailFolder") for f in folders)
    created = session.post("me/mailFolders", json={"displayName": "Temp"}).json()
    victim = session.post("me/mailFolders", json={"displayName": "Gone soon"}).json()
    _, delta_link = run_round(session, delta_link)
    session.patch(f"me/mailFolders/{created['id']}", json={"displayName": "Kept"})
    session.delete(f"me/mailFolders/{victim['id']}")          # to Deleted Items (an update) ...
    session.delete(f"me/mailFolders/{victim['id']}")          # ... then gone
    changes, _ = run_round(session, delta_link)
    by_id = {c["id"]: c for c in changes}
    assert by_id[created["id"]]["displayName"] == "Kept"
    assert by_id[victim["id"]]["@removed"] == {"reason": "deleted"}


def test_delta_of_a_deleted_folder_is_404(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    folder = session.post("me/mailFolders", json={"displayName": "Short lived"}).json()
    _, link = run_round(session, DELTA.format(folder["id"]))
    session.delete(f"me/mailFolders/{folder['id']}")
    session.delete(f"me/mailFolders/{folder['id']}")
    response = session.get(link)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "ErrorItemNotFound"
