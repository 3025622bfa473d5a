"""The sandbox's saved state: stop it, start it on the same file, and what a linked account uses still works."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from graph_sandbox.config import SandboxConfig
from graph_sandbox.persistence import FORMAT
from graph_sandbox.server import SandboxServer
from tests.graph_sandbox.signin import token, user_tokens
from tests.graph_sandbox.test_subscriptions import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def graph(base: str, access: str, method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(method, f"{base}/v1.0/{path}", json=body, timeout=15,
                            headers={"Authorization": f"Bearer {access}"})


def delta_round(base: str, access: str, url: str) -> tuple[list[dict[str, Any]], str]:
    items: list[dict[str, Any]] = []
    while True:
        answer = requests.get(url if url.startswith("http") else f"{base}/v1.0/{url}", timeout=15,
                              headers={"Authorization": f"Bearer {access}"})
        assert answer.status_code == 200, answer.text
        items += answer.json()["value"]
        if "@odata.deltaLink" in answer.json():
            return items, answer.json()["@odata.deltaLink"]
        url = answer.json()["@odata.nextLink"]


def test_a_restarted_sandbox_keeps_tokens_subscriptions_and_mail(tmp_path: Path, receiver: Receiver) -> None:
    # No delta lag: the test reads delta right after the notification (the token cache stays on).
    config = SandboxConfig(users=2, messages_per_user=12, state_path=str(tmp_path / "state.pickle"),
                           allow_http_loopback_webhooks=True, delta_lag_s=0.0)
    first = SandboxServer(config)
    base = first.start()
    port = urlsplit(base).port
    user = min(first.state.users.values(), key=lambda u: u.index)
    try:
        tokens, _ = user_tokens(base, user.mail)
        access, refresh = tokens["access_token"], tokens["refresh_token"]
        hook, path = receiver.new()
        life, _ = receiver.new()
        sub = graph(base, access, "POST", "subscriptions", {
            "changeType": "created,updated", "notificationUrl": hook, "lifecycleNotificationUrl": life,
            "resource": "me/messages", "clientState": "kept",
            "expirationDateTime": _in_minutes(base, 3000)})
        assert sub.status_code == 201, sub.text
        message = graph(base, access, "GET", "me/mailFolders/inbox/messages?$top=1").json()["value"][0]
        flipped = not message["isRead"]
        assert graph(base, access, "PATCH", f"me/messages/{message['id']}", {"isRead": flipped}).ok
        folder = graph(base, access, "POST", "me/mailFolders", {"displayName": "Kept over restarts"}).json()
        # ... and a change made by a person on the sandbox's mail page.
        inbox_id = graph(base, access, "GET", "me/mailFolders/inbox").json()["id"]
        pressed = requests.post(f"{base}/sandbox/mail/action", allow_redirects=False, timeout=10, data={
            "user": user.id, "folder": inbox_id, "message": message["id"], "action": "flag"})
        assert pressed.status_code == 303, pressed.text
        receiver.wait(lambda: len(path.items) >= 2, "the two updates' notifications")
        _, delta_link = delta_round(base, access, "me/mailFolders/inbox/messages/delta")
    finally:
        first.stop()
    saved = pickle.loads((tmp_path / "state.pickle").read_bytes())
    assert saved["format"] == FORMAT and saved["subscriptions"]["subscriptions"]

    second = SandboxServer(config, port=port or 0)
    assert second.start() == base
    try:
        # The access token issued before the restart still authenticates, and the mail change is there.
        kept = graph(base, access, "GET", f"me/messages/{message['id']}")
        assert kept.status_code == 200, kept.text
        assert kept.json()["isRead"] is flipped
        assert kept.json()["flag"]["flagStatus"] == "flagged"
        assert graph(base, access, "GET", f"me/mailFolders/{folder['id']}").json()["displayName"] == \
            "Kept over restarts"
        # The refresh token still redeems.
        refreshed = token(base, {"grant_type": "refresh_token", "refresh_token": refresh})
        assert refreshed.status_code == 200, refreshed.text
        fresh = refreshed.json()["access_token"]
        # The delta link from before the restart goes on: nothing changed since.
        assert delta_round(base, fresh, delta_link)[0] == []
        # The subscription survived and delivers what happens now.
        assert graph(base, fresh, "GET", f"subscriptions/{sub.json()['id']}").status_code == 200
        delivered = requests.post(f"{base}/sandbox/mailboxes/{user.id}/deliver", json={"count": 1}, timeout=10)
        new_id = delivered.json()["delivered"][0]["restId"]
        receiver.wait(lambda: any(n["resourceData"]["id"] == new_id for n in path.items), "the new mail")
        changes, _ = delta_round(base, fresh, delta_link)
        assert [c["id"] for c in changes] == [new_id]
    finally:
        second.stop()


def test_a_snapshot_for_other_data_is_kept_aside_not_loaded(tmp_path: Path) -> None:
    state = tmp_path / "state.pickle"
    first = SandboxServer(SandboxConfig(users=1, messages_per_user=3, state_path=str(state)))
    base = first.start()
    user = next(iter(first.state.users.values()))
    requests.post(f"{base}/sandbox/mailboxes/{user.id}/deliver", json={"count": 2}, timeout=10).raise_for_status()
    first.stop()
    assert state.exists()
    other = SandboxServer(SandboxConfig(users=1, messages_per_user=4, state_path=str(state)))
    base = other.start()
    try:
        users = requests.get(f"{base}/sandbox/users", timeout=10).json()["users"]
        assert users[0]["messageCount"] == 4                      # seeded afresh, not the 5 saved
        assert [p.name.startswith("state.pickle.discarded-") for p in tmp_path.iterdir()].count(True) == 1
    finally:
        other.stop()


def _in_minutes(base: str, minutes: int) -> str:
    now = datetime.fromisoformat(requests.get(f"{base}/sandbox/clock", timeout=10).json()["now"])
    return (now + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def test_a_snapshot_of_records_that_changed_shape_is_kept_aside(tmp_path: Path) -> None:
    # A field added to a record since the save would be missing on the loaded objects and
    # fail mid-request; the snapshot is refused instead.
    state = tmp_path / "state.pickle"
    config = SandboxConfig(users=1, messages_per_user=3, state_path=str(state))
    first = SandboxServer(config)
    base = first.start()
    user = next(iter(first.state.users.values()))
    requests.post(f"{base}/sandbox/mailboxes/{user.id}/deliver", json={"count": 2}, timeout=10).raise_for_status()
    first.stop()
    saved = pickle.loads(state.read_bytes())
    saved["shapes"]["Message"] = [*saved["shapes"]["Message"][:-1]]       # as if Message gained a field since
    state.write_bytes(pickle.dumps(saved))
    again = SandboxServer(config)
    base = again.start()
    try:
        assert requests.get(f"{base}/sandbox/users", timeout=10).json()["users"][0]["messageCount"] == 3
        assert any(p.name.startswith("state.pickle.discarded-") for p in tmp_path.iterdir())
    finally:
        again.stop()
