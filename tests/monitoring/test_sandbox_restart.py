"""``make run`` restarted: the Graph sandbox stops and starts again on its saved state, the product carries on.

The devhost runs every function against Azurite, the search node and a sandbox with
a ``state_path``. An account is linked and synced; the sandbox is stopped
and started again on the same port and file; its clock is then moved past
the access token's hour, so the product must redeem its refresh token.
A message change and a folder rename made afterwards must reach the store
through the subscriptions created before the restart (no sweeps, no polls).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from devhost.services.process import free_port
from graph_sandbox.config import SandboxConfig
from mailsync.models import AccountStatus
from mailsync.settings import Settings
from mailsync.store.engines import connect
from mailsync.store.search_store import SearchStore, StoreOptions
from tests.fixtures.devhost import app_settings, start_devhost
from tests.fixtures.graph_sandbox import start_sandbox
from tests.monitoring.test_end_to_end import Linked, Stack, stored_folder, subscription_of

KEY_ENTRY = f"rst1:{base64.b64encode(bytes(range(72, 104))).decode()}"


def wait_for(what: str, check: Callable[[], bool], stack: Stack, timeout_s: float = 60.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} did not happen in {timeout_s:g} s\n" + stack.host.logs()[-4000:])
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_linked_account_keeps_working_across_a_sandbox_restart(azurite: Any, search_store_url: str,
                                                                  tmp_path: Path) -> None:
    for directory in ("local", "devhost"):
        (tmp_path / directory).mkdir()
    config = SandboxConfig(seed=29, users=1, messages_per_user=80, state_path=str(tmp_path / "sandbox.pickle"))
    sandbox = start_sandbox(config)
    port = free_port()
    env = app_settings(name="rst", storage=azurite.connection_string, search_store_url=search_store_url,
                       port=port, local_dir=tmp_path / "local", key_entry=KEY_ENTRY,
                       GRAPH_SANDBOX_URL=sandbox.base_url, POLL_INTERVAL_SUBSCRIBED_S="0", SIGNALR_HUB="mailsync")
    host = start_devhost(env, port=port, log_dir=tmp_path / "devhost")
    settings = Settings.from_env(env)
    store = SearchStore(connect(search_store_url), StoreOptions(prefix=settings.index_prefix))
    stack = Stack(host, sandbox, env, settings, store)
    try:
        linked: Linked = stack.link(0)
        subscription = subscription_of(stack, linked)
        wait_for("the initial sync", lambda: stack.status(linked) == AccountStatus.SYNCED.value, stack, 120)
        stack.wait_converged(linked, timeout_s=60)
        sandbox.stop()

        sandbox = stack.sandbox = start_sandbox(config, port=urlsplit(sandbox.base_url).port or 0)
        assert subscription in {s["id"] for s in sandbox.admin("GET", "subscriptions").json()["value"]}
        # Past the access token's lifetime: the product's next call needs its refresh token.
        assert sandbox.admin("POST", "clock", json={"advance_s": 3700}).ok
        refreshes = sandbox.admin("GET", "identity").json()["refreshes"]

        message = sandbox.snapshot(linked.user)["messages"][0]
        graph = sandbox.graph(linked.user)
        assert graph.patch(f"me/messages/{message['id']}", json={"isRead": not message["isRead"]}).ok
        waited = wait_for("the change made after the restart reaching the store", lambda: (
            (got := store.get_message(linked.account_id, message["id"])) is not None
            and got.is_read is (not message["isRead"])), stack)
        assert sandbox.admin("GET", "identity").json()["refreshes"] > refreshes
        inbox = graph.get("me/mailFolders/inbox").json()
        projects = next(f for f in sandbox.snapshot(linked.user)["folders"]
                        if f["parentFolderId"] == inbox["id"])
        assert graph.patch(f"me/mailFolders/{projects['id']}", json={"displayName": "Renamed after restart"}).ok
        renamed = wait_for("the folder rename reaching the store", lambda: stored_folder(
            stack, linked, projects["id"]) == ("Renamed after restart", inbox["id"]), stack, 30)
        stack.wait_converged(linked, timeout_s=60)
        print(f"\nafter a sandbox restart: change → stored {waited:.2f} s (with a token refresh), "
              f"folder rename → stored {renamed:.2f} s")
    finally:
        host.stop(timeout_s=15)
        store.close()
        stack.sandbox.stop()
