"""Change monitoring end to end: devhost (every function), Graph sandbox, Azurite, the search node.

An account is linked through the real sign-in flow; the linking service
enqueues the initial sync and a SUBSCRIPTION job; the sync worker creates
the subscription (the sandbox's handshake hits our webhook); from then on
changes made through Graph reach the store through
sandbox → webhook → NOTIFIED → SYNC_FOLDER → engine. Safety sweeps are off
(``POLL_INTERVAL_SUBSCRIBED_S=0``), so after the initial sync nothing but
notifications can bring a change in — until the polling test turns
polling on for a mailbox whose notifications the sandbox drops.

The latency figures (change made at Graph → visible in the store) are
printed, never asserted.
"""

from __future__ import annotations

import base64
import json
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from devhost.services.process import free_port
from graph_sandbox.config import SandboxConfig
from mailsync.models import AccountStatus, MessageQuery
from mailsync.monitoring.polling import PollScheduler
from mailsync.monitoring.records import SubscriptionKind
from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.subscriptions import TableSubscriptionStore
from mailsync.store.engines import connect
from mailsync.store.search_store import SearchStore, StoreOptions
from tests.fixtures.devhost import DevhostProcess, app_settings, start_devhost
from tests.fixtures.graph_sandbox import SandboxTestServer, start_sandbox
from tests.linking.browser import submit_sign_in
from tests.linking.tables import linking_tables

KEY_ENTRY = f"mon1:{base64.b64encode(bytes(range(40, 72))).decode()}"
MESSAGES_PER_USER = 600
# Enough of each kind of change to show they arrive; bench/change_monitoring.py measures latency.
CHANGES_MEASURED = 24


@dataclass
class Linked:
    account_id: str
    token: str
    user: str


@dataclass
class Stack:
    host: DevhostProcess
    sandbox: SandboxTestServer
    env: dict[str, str]
    settings: Settings
    store: SearchStore

    @property
    def api(self) -> str:
        return f"{self.host.base_url}/api"

    def link(self, index: int) -> Linked:
        user = self.sandbox.users[index].mail
        browser = requests.Session()   # keeps the sign-in cookie for the callback
        created = browser.post(f"{self.api}/accounts", json={"provider": "outlook"}, timeout=30)
        assert created.status_code == 201, created.text
        body = created.json()
        callback = browser.get(submit_sign_in(body["authorize_url"], user), allow_redirects=False, timeout=30)
        assert callback.status_code == 302, callback.text
        return Linked(body["account_id"], body["access_token"], user)

    def status(self, linked: Linked) -> str:
        view = requests.get(f"{self.api}/accounts/{linked.account_id}",
                            headers={"Authorization": f"Bearer {linked.token}"}, timeout=30)
        assert view.status_code == 200, view.text
        return str(view.json()["status"])

    def truth(self, linked: Linked) -> dict[str, tuple[str, bool, str]]:
        snap = self.sandbox.snapshot(linked.user)
        return {m["id"]: (m["folderId"], m["isRead"], m["flagStatus"]) for m in snap["messages"]}

    def stored(self, linked: Linked) -> dict[str, tuple[str, bool, str]]:
        self.store.refresh()
        out: dict[str, tuple[str, bool, str]] = {}
        cursor = None
        while True:
            page = self.store.list_messages(linked.account_id, MessageQuery(limit=500, cursor=cursor))
            for m in page.messages:
                out[m.message_id] = (m.folder_id, m.is_read, m.flag_status.value)
            cursor = page.next_cursor
            if cursor is None:
                return out

    def differences(self, linked: Linked) -> int:
        truth, stored = self.truth(linked), self.stored(linked)
        return len(set(truth.items()) ^ set(stored.items()))

    def diff_report(self, linked: Linked) -> str:
        truth, stored = self.truth(linked), self.stored(linked)
        lines = [f"{mid}: mailbox {truth.get(mid)} store {stored.get(mid)}"
                 for mid in sorted(set(truth) | set(stored)) if truth.get(mid) != stored.get(mid)]
        return "\n".join(lines[:20])

    def wait_converged(self, linked: Linked, timeout_s: float) -> float:
        started = time.monotonic()
        while True:
            diff = self.differences(linked)
            if diff == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                pytest.fail(f"store still differs from the mailbox in {diff} messages after {timeout_s:g} s\n"
                            + self.diff_report(linked))
            time.sleep(0.5)

    def graph(self, linked: Linked) -> Any:
        return self.sandbox.graph(linked.user)

    def log_lines(self, pattern: str, since: int = 0) -> list[dict[str, Any]]:
        out = []
        for line in self.host.logs()[since:].splitlines():
            if pattern in line and line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def delivery(self) -> dict[str, int]:
        return dict(self.sandbox.admin("GET", "subscriptions").json()["delivery"])


def running_stack(config: SandboxConfig, name: str, azurite: Any, search_store_url: str,
                  tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[Stack]:
    """The whole stack for a module: the sandbox as ``config`` says, a devhost with every function whose app
    settings ``env`` adds to (``{port}`` in a value: the devhost's own port), the store; stopped after."""
    sandbox = start_sandbox(config)
    port = free_port()
    settings_env = app_settings(
        name=name, storage=azurite.connection_string, search_store_url=search_store_url, port=port,
        local_dir=tmp_path_factory.mktemp("local"), key_entry=KEY_ENTRY, GRAPH_SANDBOX_URL=sandbox.base_url,
        POLL_INTERVAL_SUBSCRIBED_S="0",   # no safety sweeps: only notifications bring changes in
        SIGNALR_HUB="mailsync",
        **{key: value.replace("{port}", str(port)) for key, value in env.items()},
    )
    host = start_devhost(settings_env, port=port, log_dir=tmp_path_factory.mktemp("devhost"))
    settings = Settings.from_env(settings_env)
    store = SearchStore(connect(search_store_url), StoreOptions(prefix=settings.index_prefix))
    try:
        yield Stack(host, sandbox, settings_env, settings, store)
    finally:
        host.stop(timeout_s=15)
        store.close()
        sandbox.stop()


@pytest.fixture(scope="module")
def stack(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(
        SandboxConfig(seed=23, users=3, messages_per_user=MESSAGES_PER_USER), "mon", azurite, search_store_url,
        tmp_path_factory,
        GRAPH_PAGE_SIZE="50")             # many pages: the initial sync lasts long enough to change mail during it


def subscription_of(stack: Stack, linked: Linked, timeout_s: float = 30.0) -> str:
    subscriptions = TableSubscriptionStore(table_client(stack.settings, "subscriptions"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        monitor = subscriptions.get_monitor(linked.account_id)
        folders = subscriptions.get_monitor(linked.account_id, SubscriptionKind.FOLDERS)
        if monitor is not None and monitor.subscription_id and folders is not None and folders.subscription_id:
            return monitor.subscription_id
        time.sleep(0.2)
    lines = stack.host.logs().splitlines()
    about = [line for line in lines
             if "subscri" in line.lower() or (linked.account_id in line and '"level":"WARNING"' in line)]
    pytest.fail("no subscription was created after linking\n" + "\n".join(about[-40:])
                + "\n...\n" + "\n".join(lines[-10:]))


def mutate(stack: Stack, linked: Linked, rng: random.Random, count: int) -> None:
    """Read/unread, flag, move, delete and new mail, through Graph as a user would."""
    graph = stack.graph(linked)
    snap = stack.sandbox.snapshot(linked.user)
    folders = [f["id"] for f in snap["folders"] if f["wellKnownName"] not in ("outbox", "drafts", "deleteditems")
               and not f["isHidden"]]
    ids = [m["id"] for m in snap["messages"]]
    rng.shuffle(ids)
    for n in range(count):
        message = ids[n % len(ids)]
        op = n % 5
        if op == 0:
            answer = graph.patch(f"me/messages/{message}", json={"isRead": bool(rng.getrandbits(1))})
        elif op == 1:
            answer = graph.patch(f"me/messages/{message}", json={"flag": {"flagStatus": "flagged"}})
        elif op == 2:
            answer = graph.post(f"me/messages/{message}/move", json={"destinationId": rng.choice(folders)})
        elif op == 3:
            answer = graph.delete(f"me/messages/{message}")
        else:
            answer = stack.sandbox.admin("POST", f"mailboxes/{linked.user}/deliver", json={"count": 1})
        assert answer.status_code < 300 or answer.status_code == 404, answer.text


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@pytest.fixture(scope="module")
def linked(stack: Stack) -> Linked:
    return stack.link(0)


def test_changes_during_the_initial_sync_reach_the_store(stack: Stack, linked: Linked) -> None:
    subscription_of(stack, linked)
    assert stack.status(linked) == "syncing", "the initial sync ended before the test could change mail during it"
    marker = len(stack.host.logs())
    mutate(stack, linked, random.Random(1), 40)
    waited = stack.wait_converged(linked, timeout_s=180)
    deadline = time.monotonic() + 60
    while stack.status(linked) != AccountStatus.SYNCED.value and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.status(linked) == AccountStatus.SYNCED.value
    stack.wait_converged(linked, timeout_s=60)
    handled = stack.log_lines("notifications resolved to", since=marker)
    print(f"\nduring initial sync: converged {waited:.1f} s after 40 changes; "
          f"{len(handled)} NOTIFIED jobs ran meanwhile")
    assert handled, "no notification was handled during the initial sync"


def test_changes_after_the_initial_sync_arrive_through_the_webhook(stack: Stack, linked: Linked) -> None:
    """Measure change → stored latency, one change at a time."""
    assert stack.status(linked) == AccountStatus.SYNCED.value
    graph = stack.graph(linked)
    rng = random.Random(2)
    snap = stack.sandbox.snapshot(linked.user)
    folders = [f["id"] for f in snap["folders"] if f["wellKnownName"] not in ("outbox", "drafts")
               and not f["isHidden"]]
    latencies: list[float] = []
    for n in range(CHANGES_MEASURED):
        message = rng.choice(snap["messages"])
        op = n % 4
        started = time.monotonic()
        if op == 0:
            flipped = not stack.stored(linked)[message["id"]][1]
            assert graph.patch(f"me/messages/{message['id']}", json={"isRead": flipped}).ok
            target = message["id"]
        elif op == 1:
            assert graph.patch(f"me/messages/{message['id']}", json={"flag": {"flagStatus": "complete"}}).ok
            target = message["id"]
        elif op == 2:
            target = message["id"]
            assert graph.post(f"me/messages/{target}/move", json={"destinationId": rng.choice(folders)}).ok
        else:
            answer = stack.sandbox.admin("POST", f"mailboxes/{linked.user}/deliver", json={"count": 1}).json()
            target = answer["delivered"][0]["id"]
        expected = stack.truth(linked).get(target)
        while True:
            got = stack.store.get_message(linked.account_id, target)
            if expected is not None and got is not None and \
                    (got.folder_id, got.is_read, got.flag_status.value) == expected:
                break
            if time.monotonic() - started > 60:
                pytest.fail(f"change {n} (op {op}) did not reach the store in 60 s\n" + stack.host.logs()[-4000:])
            time.sleep(0.02)
        latencies.append(time.monotonic() - started)
        snap = stack.sandbox.snapshot(linked.user)
    stack.wait_converged(linked, timeout_s=60)
    print(f"\nchange → stored via webhook ({len(latencies)} changes): p50 {percentile(latencies, 50):.2f} s, "
          f"p99 {percentile(latencies, 99):.2f} s, max {max(latencies):.2f} s, "
          f"mean {statistics.mean(latencies):.2f} s")


def stored_folder(stack: Stack, linked: Linked, folder_id: str) -> tuple[str, str | None] | None:
    for view in stack.store.list_folders(linked.account_id):
        if view.folder.folder_id == folder_id:
            return view.folder.name, view.folder.parent_id
    return None


def test_folder_changes_arrive_through_the_folder_subscription(stack: Stack, linked: Linked) -> None:
    """Created, renamed, moved: only the me/mailFolders subscription can tell (no sweeps, no polls here)."""
    assert stack.status(linked) == AccountStatus.SYNCED.value
    graph = stack.graph(linked)
    inbox = graph.get("me/mailFolders/inbox").json()
    started = time.monotonic()
    folder = graph.post("me/mailFolders", json={"displayName": "Receipts"}).json()
    steps = [("created", lambda: None, ("Receipts", folder["parentFolderId"])),
             ("renamed", lambda: graph.patch(f"me/mailFolders/{folder['id']}", json={"displayName": "Expenses"}),
              ("Expenses", folder["parentFolderId"])),
             ("moved", lambda: graph.post(f"me/mailFolders/{folder['id']}/move",
                                          json={"destinationId": inbox["id"]}), ("Expenses", inbox["id"]))]
    timings: list[str] = []
    for name, act, expected in steps:
        answer = act()
        assert answer is None or answer.ok, answer
        begun = started if name == "created" else time.monotonic()
        while stored_folder(stack, linked, folder["id"]) != expected:
            if time.monotonic() - begun > 30:
                pytest.fail(f"folder {name} did not reach the store in 30 s: "
                            f"{stored_folder(stack, linked, folder['id'])}\n" + stack.host.logs()[-4000:])
            time.sleep(0.05)
        timings.append(f"{name} {time.monotonic() - begun:.2f} s")
    print("\nfolder change → stored via the folder subscription: " + ", ".join(timings))


def test_a_burst_of_1000_changes_is_a_bounded_number_of_jobs(stack: Stack, linked: Linked) -> None:
    marker = len(stack.host.logs())
    posts_before = stack.delivery()["posts"]
    churn = stack.sandbox.admin("POST", f"mailboxes/{linked.user}/churn", json={"operations": 1000, "seed": 5})
    assert churn.ok, churn.text
    waited = stack.wait_converged(linked, timeout_s=240)
    time.sleep(2)                      # let the last jobs finish before counting
    notified = stack.log_lines("notifications resolved to", since=marker)
    sync_jobs = sum(int(line.get("jobs", 0)) for line in notified)
    webhook_posts = stack.delivery()["posts"] - posts_before
    print(f"\nburst of 1000 changes: {webhook_posts} webhook POSTs, {len(notified)} NOTIFIED jobs, "
          f"{sync_jobs} sync jobs enqueued by them; store converged {waited:.1f} s after the burst")
    assert 0 < len(notified) <= 40
    assert sync_jobs <= 40 * 20


def test_with_notifications_dropped_polling_converges_the_store(stack: Stack) -> None:
    linked = stack.link(1)
    subscription_of(stack, linked)
    deadline = time.monotonic() + 180
    while stack.status(linked) != AccountStatus.SYNCED.value and time.monotonic() < deadline:
        time.sleep(0.5)
    stack.wait_converged(linked, timeout_s=120)
    assert stack.sandbox.admin("PUT", "faults", json={"profile": "none", "overrides": {"notify_drop": 1.0}}).ok
    try:
        mutate(stack, linked, random.Random(3), 30)
        time.sleep(2)   # changes otherwise arrive in ~0.3 s (p99 0.5 s)
        assert stack.differences(linked) > 0, "changes arrived although every notification was dropped"
        # The poll_scheduler timer's use case, run here with a short interval (the timer itself fires per minute).
        fast = Settings.from_env({**stack.env, "POLL_INTERVAL_SUBSCRIBED_S": "5", "POLL_TICK_S": "5"})
        accounts = linking_tables(fast).accounts
        scheduler = PollScheduler(fast, accounts, TableSubscriptionStore(table_client(fast, "subscriptions")),
                                  AzureJobQueue(fast))
        report = scheduler.tick()
        assert report.swept >= 1
        waited = stack.wait_converged(linked, timeout_s=90)
        print(f"\nnotifications dropped: polling converged the store {waited:.1f} s after the tick")
    finally:
        stack.sandbox.admin("PUT", "faults", json={"profile": "none"})


def test_unlinking_deletes_the_subscription(stack: Stack) -> None:
    linked = stack.link(2)
    subscription = subscription_of(stack, linked)
    at_graph = [s["id"] for s in stack.sandbox.admin("GET", "subscriptions").json()["value"]]
    assert subscription in at_graph
    answer = requests.delete(f"{stack.api}/accounts/{linked.account_id}",
                             headers={"Authorization": f"Bearer {linked.token}"}, timeout=30)
    assert answer.status_code in (200, 204), answer.text
    at_graph = [s["id"] for s in stack.sandbox.admin("GET", "subscriptions").json()["value"]]
    assert subscription not in at_graph
    subscriptions = TableSubscriptionStore(table_client(stack.settings, "subscriptions"))
    assert subscriptions.get(subscription) is None and subscriptions.get_monitor(linked.account_id) is None
    assert at_graph == [s["id"] for s in stack.sandbox.admin("GET", "subscriptions").json()["value"]
                        if s["userId"] != stack.sandbox.users[2].id]
