"""The /sandbox/ admin API over HTTP: determinism, reset, snapshot, counters, consent, mail making."""

from __future__ import annotations

import subprocess
import sys

from tests.fixtures.graph_sandbox import SandboxTestServer


def test_same_seed_same_tenant_different_seed_different(sandbox_factory) -> None:
    a = sandbox_factory(seed=7, users=2, messages_per_user=25)
    b = sandbox_factory(seed=7, users=2, messages_per_user=25)
    c = sandbox_factory(seed=8, users=2, messages_per_user=25)
    assert a.admin("GET", "users").json() == b.admin("GET", "users").json()
    assert a.snapshot(a.users[1].mail) == b.snapshot(b.users[1].mail)
    assert a.snapshot(a.users[1].mail) != c.snapshot(c.users[1].mail)
    # Adding users keeps the existing users (their mail has new colleagues to come from).
    d = sandbox_factory(seed=7, users=3, messages_per_user=25)
    assert d.admin("GET", "users").json()["users"][:2] == a.admin("GET", "users").json()["users"]


def test_seeded_mailbox_looks_like_outlook(graph_sandbox: SandboxTestServer) -> None:
    snapshot = graph_sandbox.snapshot(graph_sandbox.users[0])
    names = {f["wellKnownName"] for f in snapshot["folders"]}
    assert {"inbox", "sentitems", "drafts", "deleteditems", "archive", "junkemail"} <= names
    by_id = {f["id"]: f for f in snapshot["folders"]}
    nested = [f for f in snapshot["folders"] if f["parentFolderId"] in by_id]
    user_folders = [f for f in snapshot["folders"] if f["wellKnownName"] is None]
    assert nested and len(user_folders) >= 3
    messages = snapshot["messages"]
    assert snapshot["messageCount"] == len(messages) == 60
    assert any(m["isRead"] for m in messages) and any(not m["isRead"] for m in messages)
    assert len({m["subject"] for m in messages}) > 30
    assert len({m["from"]["address"] for m in messages}) > 5
    for folder in snapshot["folders"]:
        inside = [m for m in messages if m["folderId"] == folder["id"]]
        assert folder["totalItemCount"] == len(inside)
        assert folder["unreadItemCount"] == sum(1 for m in inside if not m["isRead"])
    sent = by_id[next(f["id"] for f in snapshot["folders"] if f["wellKnownName"] == "sentitems")]
    assert all(m["from"]["address"] == graph_sandbox.users[0].mail for m in messages if m["folderId"] == sent["id"])


def test_snapshot_agrees_with_the_graph_api(graph_sandbox: SandboxTestServer) -> None:
    user = graph_sandbox.users[2]
    snapshot = graph_sandbox.snapshot(user.mail)
    session = graph_sandbox.graph(user)
    ids = []
    url = "me/messages?$select=id&$top=25"
    while url:
        body = session.get(url).json()
        ids += [m["id"] for m in body["value"]]
        url = body.get("@odata.nextLink")
    assert sorted(ids) == sorted(m["id"] for m in snapshot["messages"])
    assert graph_sandbox.admin("GET", "mailboxes/nobody/snapshot").status_code == 404


def test_reset_restores_the_seeded_world_and_forgets_sync_states(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=2, messages_per_user=30)
    user = sandbox.users[0]
    before = sandbox.snapshot(user)
    session = sandbox.graph(user)
    link = session.get("me/mailFolders/inbox/messages/delta", headers={"Prefer": "odata.maxpagesize=5"}).json()
    sandbox.admin("POST", f"mailboxes/{user.id}/churn", json={"operations": 20, "seed": 1})
    assert sandbox.snapshot(user) != before
    assert sandbox.admin("POST", "reset").status_code == 200
    assert sandbox.snapshot(user) == before
    assert session.get(link["@odata.nextLink"]).status_code == 410
    # A reset can also change the data.
    bigger = sandbox.admin("POST", "reset", json={"messages_per_user": 50}).json()
    assert bigger["config"]["messages_per_user"] == 50
    assert sandbox.snapshot(user)["messageCount"] == 50
    assert sandbox.admin("POST", "reset", json={"colour": "blue"}).status_code == 400


def test_counters_count_what_was_served(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=5)
    session = sandbox.graph()
    user = sandbox.users[0]
    sandbox.admin("POST", "counters/reset")
    session.get(f"users/{user.id}/mailFolders/inbox")
    session.get(f"users/{user.id}/mailFolders/nowhere")
    session.get(f"users/{user.id}/mailFolders/inbox/messages/delta")
    counters = sandbox.admin("GET", "counters").json()
    assert counters["requests"] == 3 and counters["served"] == 2 and counters["deltaPages"] == 1
    assert counters["byStatus"] == {"200": 2, "404": 1} and counters["inFlight"] == 0


def test_config_changes_at_run_time(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=5)
    changed = sandbox.admin("PATCH", "config", json={"latency_ms": 5, "max_concurrency": 2, "rate_limit": "100/1m"})
    assert changed.status_code == 200
    assert (changed.json()["latency_ms"], changed.json()["rate_limit_requests"], changed.json()["rate_limit_window_s"]
            ) == (5, 100, 60.0)
    assert sandbox.admin("GET", "throttle").json()["maxConcurrency"] == 2
    assert sandbox.graph().get(f"users/{sandbox.users[0].id}").status_code == 200
    assert sandbox.admin("PATCH", "config", json={"seed": 3}).status_code == 400          # needs a reset
    assert sandbox.admin("PATCH", "config", json={"latency_ms": -1}).status_code == 400
    assert sandbox.admin("POST", "clock", json={"advance_s": -5}).status_code == 400


def test_revoked_grant_locks_the_user_out_until_restored(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=2, messages_per_user=5)
    user = sandbox.users[0]
    session = sandbox.graph(user)
    assert session.get("me").status_code == 200
    revoked = sandbox.admin("POST", f"users/{user.mail}/revoke-grant").json()
    assert revoked["revoked"] == [{"userId": user.id, "appId": "*"}]
    denied = session.get("me")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert sandbox.graph(sandbox.users[1]).get("me").status_code == 200        # only that user
    assert sandbox.admin("POST", f"users/{user.id}/restore-grant").json()["revoked"] == []
    assert sandbox.admin("POST", "users/nobody/revoke-grant").status_code == 404


def test_deliver_and_churn_make_mail_happen(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=2, messages_per_user=20)
    user = sandbox.users[1]
    before = sandbox.snapshot(user)
    delivered = sandbox.admin("POST", f"mailboxes/{user.mail}/deliver", json={"count": 4, "seed": 3}).json()
    assert len(delivered["delivered"]) == 4
    after = sandbox.snapshot(user)
    assert after["messageCount"] == before["messageCount"] + 4
    inbox = next(f["id"] for f in after["folders"] if f["wellKnownName"] == "inbox")
    new = {m["id"]: m for m in after["messages"] if m["id"] in {d["id"] for d in delivered["delivered"]}}
    assert all(m["folderId"] == inbox and not m["isRead"] for m in new.values())
    ops = sandbox.admin("POST", f"mailboxes/{user.id}/churn", json={"operations": 25, "seed": 4}).json()
    assert len(ops["operations"]) == 25 and {o["op"] for o in ops["operations"]} >= {"read", "new"}
    assert sandbox.admin("POST", f"mailboxes/{user.id}/churn", json={"operations": -1}).status_code == 400


def test_cli_help_and_bad_arguments() -> None:
    ok = subprocess.run([sys.executable, "-m", "graph_sandbox", "--help"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "--messages-per-user" in ok.stdout and "--faults" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "graph_sandbox", "--rate-limit", "fast"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "rate limit" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "graph_sandbox", "--users", "0"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "users" in bad.stderr
