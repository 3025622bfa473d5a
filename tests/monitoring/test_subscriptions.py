"""Subscription lifecycle against the Graph sandbox, with our webhook served by the devhost.

The manager and the job handler run in the test process; Graph's
validation handshake, notifications and lifecycle events go over HTTP to
the webhook functions under the devhost, which share this test's Azurite
tables and queue. Lifetimes are shortened and the sandbox's clock is moved
forward (our clock follows it), so renewal is tested without waiting.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailsync.jobs import EVERY_FOLDER, SUBSCRIBED, THEN_SYNC, JobKind, new_job
from mailsync.models import Account, Job
from mailsync.monitoring import subscriptions as subscriptions_module
from mailsync.monitoring.graph_api import GraphMessageLocator, GraphSubscriptionApi
from mailsync.monitoring.handler import MonitoringJobs
from mailsync.monitoring.records import AccountMonitor, CreatedSubscription, SubscriptionKind, SubscriptionRequest
from mailsync.monitoring.resource_data import (
    FOLDER_ONLY_SELECT,
    MESSAGE_SELECT,
    NotificationKeys,
    load_notification_keys,
    new_certificate_pem,
    parse_certificates,
)
from mailsync.monitoring.subscriptions import SubscriptionManager
from mailsync.providers.graph_client import GraphClient
from mailsync.settings import Settings
from mailsync.storage.sync_rows import AccountSyncState
from mailsync.store.search_store import SearchStore
from tests.fixtures.devhost import DevhostProcess
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.graph_sandbox.signin import user_tokens
from tests.monitoring.harness import Harness, make_harness

# Graph grants at least 45 minutes; the sandbox's clock is moved instead of waiting.
LIFETIME_S = 3600
RENEW_BEFORE_S = 1800


@dataclass
class Rig:
    harness: Harness
    sandbox: SandboxTestServer
    webhook: DevhostProcess
    manager: SubscriptionManager
    jobs: MonitoringJobs
    users: dict[str, str]                  # account id -> sandbox user address
    offset_s: float = 0.0                  # our clock follows the sandbox's

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s)

    def advance(self, seconds: float) -> None:
        assert self.sandbox.admin("POST", "clock", json={"advance_s": seconds}).ok
        self.offset_s += seconds

    def client_for(self, account_id: str) -> GraphClient:
        address = self.users[account_id]

        def token(force_refresh: bool) -> str:
            # The clock moves past the access token's hour: sign in again, as a refresh would.
            return str(user_tokens(self.sandbox.base_url, address)[0]["access_token"]) if force_refresh \
                else self.sandbox.user_token(address)

        return GraphClient(token, base_url=f"{self.sandbox.base_url}/v1.0")

    def link(self, index: int) -> str:
        account = self.harness.add_account()
        self.users[account] = self.sandbox.users[index].mail
        return account

    def at_graph(self, subscription_id: str) -> dict[str, Any] | None:
        for sub in self.sandbox.admin("GET", "subscriptions").json()["value"]:
            if sub["id"] == subscription_id:
                return sub  # type: ignore[no-any-return]
        return None

    def monitor(self, account: str, kind: SubscriptionKind = SubscriptionKind.MESSAGES) -> AccountMonitor:
        monitor = self.harness.subscriptions.get_monitor(account, kind)
        assert monitor is not None
        return monitor

    def run_jobs(self, wait_s: float = 0.0) -> list[Job]:
        """Run what the webhook and the manager enqueued (as the sync worker would); engine jobs are returned."""
        left: list[Job] = []
        for job in self.harness.drain(wait_s):
            if self.jobs.handles(job.kind) and job.kind != JobKind.SYNC_ACCOUNT:
                self.jobs.run(job)
            else:
                left.append(job)
        return left

    def wait_pending(self, account: str, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.harness.pending.get(account) is not None:
                return True
            time.sleep(0.1)
        return False

    def change(self, account: str) -> None:
        """A change in the mailbox: one new message (Graph notifies `created`)."""
        user = self.users[account]
        assert self.sandbox.admin("POST", f"mailboxes/{user}/deliver", json={"count": 1}).ok


@pytest.fixture
def rig(storage_env: dict[str, str], store: SearchStore, devhost_factory: Callable[..., DevhostProcess],
        sandbox_factory: Callable[..., SandboxTestServer], tmp_path: Path) -> Iterator[Rig]:
    sandbox = sandbox_factory(users=3, messages_per_user=5)
    webhook = devhost_factory({**storage_env, "MAILSYNC_LOCAL_DIR": str(tmp_path), "NOTIFY_COALESCE_S": "0",
                               "GRAPH_SANDBOX_URL": sandbox.base_url},
                              functions=["graph_webhook", "graph_lifecycle"])
    harness = make_harness(storage_env, NOTIFY_COALESCE_S="0", GRAPH_SANDBOX_URL=sandbox.base_url,
                           PUBLIC_BASE_URL=webhook.base_url, SUBSCRIPTION_LIFETIME_S=str(LIFETIME_S),
                           SUBSCRIPTION_RENEW_BEFORE_S=str(RENEW_BEFORE_S))
    holder: dict[str, Rig] = {}
    api = GraphSubscriptionApi(lambda account: holder["rig"].client_for(account))
    manager = SubscriptionManager(harness.settings, harness.subscriptions, api, harness.accounts, harness.queue,
                                  clock=lambda: holder["rig"].now())
    locator = GraphMessageLocator(lambda account: holder["rig"].client_for(account))
    jobs = MonitoringJobs(harness.pending, harness.accounts, store, locator, manager, harness.queue,
                          rows=harness.sync_rows.load)
    holder["rig"] = Rig(harness, sandbox, webhook, manager, jobs, {})
    yield holder["rig"]


def test_a_subscription_is_created_with_the_handshake_and_its_notifications_are_accepted(rig: Rig) -> None:
    account = rig.link(0)
    monitor = rig.manager.ensure(account)
    assert monitor is not None and monitor.healthy(rig.now()) and monitor.subscription_id
    at_graph = rig.at_graph(monitor.subscription_id)
    assert at_graph is not None
    assert at_graph["resource"] == "me/messages" and at_graph["changeType"] == "created,updated,deleted"
    folders = rig.monitor(account, SubscriptionKind.FOLDERS)
    assert folders.healthy(rig.now()) and folders.subscription_id not in (None, monitor.subscription_id)
    at_graph_folders = rig.at_graph(folders.subscription_id)  # type: ignore[arg-type]
    assert at_graph_folders is not None and at_graph_folders["resource"] == "me/mailFolders"
    assert at_graph_folders["lifecycleNotificationUrl"] == at_graph["lifecycleNotificationUrl"]
    assert at_graph["notificationUrl"] == f"{rig.webhook.base_url}/api/graph/webhook"
    assert at_graph["lifecycleNotificationUrl"] == f"{rig.webhook.base_url}/api/graph/lifecycle"
    assert at_graph["immutableIds"] is True
    # The clientState went to Graph; we keep only its hash.
    row = rig.harness.subscriptions.get(monitor.subscription_id)
    assert row is not None and len(at_graph["clientState"]) <= 128
    assert at_graph["clientState"] not in str(row) and row.account_id == account
    # The creations are followed by a sync covering the gap before our rows existed: one sweep of the
    # folder list and every folder, straight to the engine (it covers the folders' subscription too).
    swept = rig.harness.drain()
    assert [(j.kind, j.reason, j.attrs.get(EVERY_FOLDER)) for j in swept] == [
        (JobKind.SYNC_FOLDERS.value, SUBSCRIBED, "1")]
    rig.change(account)
    assert rig.wait_pending(account), "the sandbox's notification did not reach the pending row"
    # ensure() again: healthy and not due, nothing changes.
    again = rig.manager.ensure(account)
    assert again is not None and again.subscription_id == monitor.subscription_id


def test_a_new_accounts_first_job_subscribes_then_starts_the_sync_that_is_its_sweep(rig: Rig) -> None:
    # A new Outlook account's first job (linking enqueues it): both subscriptions, then the initial
    # sync, in the same invocation. That sync reads the mailbox after Graph began notifying, so it is
    # the sweep the creations need: one sync job, not the initial sync and a sweep of the whole mailbox.
    account = rig.link(0)
    ran: list[Job] = []

    def direct(job: Job, known: Account | None, rows: AccountSyncState | None) -> AccountSyncState | None:
        assert known is not None and known.account_id == account, "the account as read for the creations"
        ran.append(job)
        return None

    rig.jobs.run(new_job(JobKind.SUBSCRIPTION, account, reason="initial", attrs={THEN_SYNC: "1"}), direct)
    assert rig.monitor(account).healthy(rig.now()) and rig.monitor(account, SubscriptionKind.FOLDERS).healthy(rig.now())
    assert [(j.kind, j.reason, j.attrs) for j in ran] == [(JobKind.SYNC_FOLDERS.value, SUBSCRIBED, {EVERY_FOLDER: "1"})]
    assert rig.harness.drain() == [], "no sweep queued besides the sync run in place"
    # Run again (a redelivery, or a relink): the subscriptions exist, so the sync is an ordinary one.
    ran.clear()
    rig.jobs.run(new_job(JobKind.SUBSCRIPTION, account, reason="relink", attrs={THEN_SYNC: "1"}), direct)
    assert [(j.kind, j.reason, j.attrs) for j in ran] == [(JobKind.SYNC_FOLDERS.value, "relink", {})]
    # Without a runner (any caller but the sync worker), the sync goes through the queue.
    other = rig.link(1)
    rig.jobs.run(new_job(JobKind.SUBSCRIPTION, other, reason="initial", attrs={THEN_SYNC: "1"}))
    assert [(j.kind, j.reason, j.attrs) for j in rig.harness.drain()] == [
        (JobKind.SYNC_FOLDERS.value, SUBSCRIBED, {EVERY_FOLDER: "1"})]


class _MeetingCreations(GraphSubscriptionApi):
    """The real API, whose creations each wait until the other is in flight too (or fail after ``wait_s``)."""

    def __init__(self, client_for: Callable[[str], GraphClient], wait_s: float = 10.0) -> None:
        super().__init__(client_for)
        self.meeting = threading.Barrier(len(subscriptions_module.KINDS), timeout=wait_s)

    def create(self, account_id: str, request: SubscriptionRequest) -> CreatedSubscription:
        self.meeting.wait()    # one after the other, the first waits alone: BrokenBarrierError
        return super().create(account_id, request)


def test_a_new_accounts_two_subscriptions_are_created_at_once(rig: Rig) -> None:
    # The new account's sync waits on both creations, each on Graph's handshake with our webhook: they
    # run together (Graph limits subscription writes per app and tenant, not per mailbox).
    account = rig.link(0)
    h = rig.harness
    api = _MeetingCreations(rig.client_for)
    manager = SubscriptionManager(h.settings, h.subscriptions, api, h.accounts, h.queue, clock=rig.now)
    found = manager.ensure_before_sync(account)
    assert found.made == frozenset(subscriptions_module.KINDS), "a creation waited alone, or failed"
    for kind in subscriptions_module.KINDS:
        monitor = rig.monitor(account, kind)
        assert monitor.healthy(rig.now()) and rig.at_graph(monitor.subscription_id or "") is not None
    assert h.drain() == [], "the caller's sync is the sweep: nothing queued"


def test_a_new_account_whose_subscriptions_graph_refuses_is_synced_all_the_same(rig: Rig) -> None:
    account = rig.link(0)
    with socket.socket() as probe:     # a notification URL nobody answers: Graph's handshake fails
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    h = rig.harness
    unreachable = SubscriptionManager(replace(h.settings, public_base_url=dead), h.subscriptions,
                                      GraphSubscriptionApi(rig.client_for), h.accounts, h.queue, clock=rig.now)
    # Nothing made (so the handler starts an ordinary sync, as for the relink above), the failures
    # recorded for the renewer, which sweeps when it creates them.
    assert unreachable.ensure_before_sync(account).made == frozenset()
    assert rig.monitor(account).failures == 1 and rig.monitor(account, SubscriptionKind.FOLDERS).failures == 1
    assert h.drain() == []


def test_subscriptions_are_renewed_before_they_expire(rig: Rig) -> None:
    renewed, neglected = rig.link(0), rig.link(1)
    first = rig.manager.ensure(renewed)
    other = rig.manager.ensure(neglected)
    assert first is not None and other is not None and first.expires_at is not None
    original_expiry = first.expires_at
    assert rig.manager.renewal_pass().renew == 0                 # fresh: nothing is due
    rig.harness.drain()

    rig.advance(LIFETIME_S - RENEW_BEFORE_S)                      # now inside the renewal window
    report = rig.manager.renewal_pass()
    assert report.renew == 2 and report.create == 0
    # Renew only one of the two (the other's job is lost, say).
    jobs = [j for j in rig.harness.drain() if j.kind == JobKind.SUBSCRIPTION.value]
    for job in jobs:
        if job.account_id == renewed:
            rig.jobs.run(job)
    monitor = rig.monitor(renewed)
    assert monitor.subscription_id == first.subscription_id and monitor.expires_at is not None
    assert monitor.expires_at > original_expiry
    at_graph = rig.at_graph(first.subscription_id)  # type: ignore[arg-type]
    assert at_graph is not None

    rig.advance(RENEW_BEFORE_S + 60)                              # past the original expiry
    time.sleep(0.3)                                               # the sandbox's housekeeping tick
    assert rig.at_graph(first.subscription_id) is not None  # type: ignore[arg-type]
    assert rig.at_graph(other.subscription_id) is None  # type: ignore[arg-type]
    assert rig.harness.pending.get(renewed) is None
    rig.change(renewed)
    assert rig.wait_pending(renewed), "the renewed subscription stopped delivering"

    # The expired one is noticed by the renewer and recreated (new id), which resumes notifications.
    report = rig.manager.renewal_pass()
    assert report.create == 1
    rig.run_jobs()
    recreated = rig.monitor(neglected)
    assert recreated.subscription_id not in (None, other.subscription_id) and recreated.healthy(rig.now())
    assert rig.harness.subscriptions.get(other.subscription_id) is None  # type: ignore[arg-type]
    rig.change(neglected)
    assert rig.wait_pending(neglected)


def test_lifecycle_events_from_graph_renew_recreate_and_resync(rig: Rig) -> None:
    account = rig.link(0)
    first = rig.manager.ensure(account)
    assert first is not None and first.subscription_id and first.expires_at is not None
    folders = rig.monitor(account, SubscriptionKind.FOLDERS)
    rig.harness.drain()
    # Inside the 15 minutes before expiry Graph challenges both subscriptions
    # (reauthorizationRequired) and holds their notifications until we answer.
    rig.advance((first.expires_at - rig.now()).total_seconds() - 600)
    deadline = time.monotonic() + 15
    renew_jobs: list[Job] = []
    while len({j.attrs["subscription_id"] for j in renew_jobs}) < 2 and time.monotonic() < deadline:
        renew_jobs += [j for j in rig.harness.drain(0.2) if j.attrs.get("action") == "renew"]
    assert {j.attrs["subscription_id"] for j in renew_jobs} == {first.subscription_id, folders.subscription_id}
    rig.change(account)
    assert not rig.wait_pending(account, timeout_s=1.0), "Graph delivered while its challenge was open"
    for job in renew_jobs:
        rig.jobs.run(job)
    # One PATCH per subscription answered its challenge: the held notification arrives.
    assert rig.wait_pending(account), "the held notification never came after reauthorizing"
    assert not any(s["reauthorizationPending"] for s in rig.sandbox.admin("GET", "subscriptions").json()["value"])
    renewed = rig.monitor(account)
    assert renewed.subscription_id == first.subscription_id
    assert renewed.expires_at is not None and renewed.expires_at > first.expires_at
    assert rig.monitor(account, SubscriptionKind.FOLDERS).subscription_id == folders.subscription_id
    rig.harness.pending.delete(rig.harness.pending.get(account))  # type: ignore[arg-type]

    # missed → an incremental sync of the account.
    assert rig.sandbox.admin("POST", f"subscriptions/{first.subscription_id}/lifecycle",
                             json={"event": "missed"}).status_code == 202
    deadline = time.monotonic() + 15
    seen: list[Job] = []
    while not any(j.kind == JobKind.SYNC_ACCOUNT.value for j in seen) and time.monotonic() < deadline:
        seen += rig.harness.drain(0.2)
    assert any(j.kind == JobKind.SYNC_ACCOUNT.value and j.reason == "missed" for j in seen)

    # subscriptionRemoved → a new subscription (new id), the old rows gone, then a catch-up sync.
    assert rig.sandbox.admin("POST", f"subscriptions/{first.subscription_id}/lifecycle",
                             json={"event": "subscriptionRemoved"}).status_code == 202
    deadline = time.monotonic() + 15
    while rig.monitor(account).subscription_id == first.subscription_id and time.monotonic() < deadline:
        rig.run_jobs(0.2)
    current = rig.monitor(account)
    assert current.subscription_id not in (None, first.subscription_id)
    assert rig.at_graph(current.subscription_id) is not None  # type: ignore[arg-type]
    assert rig.harness.subscriptions.get(first.subscription_id) is None
    # The folder subscription was not touched; its own removal recreates only it.
    assert rig.monitor(account, SubscriptionKind.FOLDERS).subscription_id == folders.subscription_id
    assert rig.sandbox.admin("POST", f"subscriptions/{folders.subscription_id}/lifecycle",
                             json={"event": "subscriptionRemoved"}).status_code == 202
    deadline = time.monotonic() + 15
    while (rig.monitor(account, SubscriptionKind.FOLDERS).subscription_id == folders.subscription_id
           and time.monotonic() < deadline):
        rig.run_jobs(0.2)
    assert rig.monitor(account, SubscriptionKind.FOLDERS).subscription_id != folders.subscription_id
    assert rig.monitor(account).subscription_id == current.subscription_id


def test_a_failing_creation_is_recorded_and_retried_with_back_off(rig: Rig) -> None:
    account = rig.link(0)
    # A notification URL nobody answers: Graph's validation handshake fails and creation is refused (400).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    h = rig.harness
    unreachable = SubscriptionManager(replace(h.settings, public_base_url=dead), h.subscriptions,
                                      GraphSubscriptionApi(rig.client_for), h.accounts, h.queue, clock=rig.now)
    monitor = unreachable.ensure(account)
    assert monitor is not None and monitor.subscription_id is None and monitor.failures == 1
    assert monitor.last_error == "provider_error"
    assert rig.sandbox.admin("GET", "subscriptions").json()["value"] == []
    assert rig.monitor(account, SubscriptionKind.FOLDERS).failures == 1
    assert monitor.retry_at is not None and monitor.retry_at > rig.now()
    assert rig.manager.renewal_pass().create == 0                 # backing off
    rig.advance(61)
    assert rig.manager.renewal_pass().create == 1
    rig.run_jobs()
    healthy = rig.monitor(account)
    assert healthy.subscription_id and healthy.failures == 0
    assert rig.monitor(account, SubscriptionKind.FOLDERS).healthy(rig.now())


def test_deleting_an_account_deletes_its_subscription(rig: Rig) -> None:
    account = rig.link(0)
    monitor = rig.manager.ensure(account)
    assert monitor is not None and monitor.subscription_id
    folders = rig.monitor(account, SubscriptionKind.FOLDERS)
    rig.manager.delete_for_account(account)
    assert rig.at_graph(monitor.subscription_id) is None
    assert rig.at_graph(folders.subscription_id) is None  # type: ignore[arg-type]
    assert rig.sandbox.admin("GET", "subscriptions").json()["value"] == []
    assert rig.harness.subscriptions.get(monitor.subscription_id) is None
    assert rig.harness.subscriptions.get_monitor(account) is None
    assert rig.harness.subscriptions.get_monitor(account, SubscriptionKind.FOLDERS) is None
    rig.manager.delete_for_account(account)                        # idempotent


def test_the_renewer_forgets_accounts_that_no_longer_exist(rig: Rig) -> None:
    account = rig.link(0)
    monitor = rig.manager.ensure(account)
    assert monitor is not None and monitor.subscription_id
    rig.harness.accounts.delete(account)
    assert rig.manager.renewal_pass().removed == 1
    assert rig.at_graph(monitor.subscription_id) is None
    assert rig.harness.subscriptions.get_monitor(account) is None


def test_with_a_certificate_new_mail_arrives_with_its_folder_and_renewals_carry_the_current_certificate(
        rig: Rig, tmp_path: Path) -> None:
    """Rich notifications end to end: the manager subscribes with our certificate, the devhost's webhook (same
    development certificate, same local dir) checks the validation tokens and decrypts the folder into the
    pending row; a basic subscription is replaced by a rich one at its renewal; renewals hand Graph the
    current certificate (key rotation)."""
    keys = load_notification_keys(Settings.from_env({"GRAPH_SANDBOX_URL": rig.sandbox.base_url,
                                                     "MAILSYNC_LOCAL_DIR": str(tmp_path)}))
    assert keys is not None
    h = rig.harness
    api = GraphSubscriptionApi(rig.client_for)

    def manager(with_keys: NotificationKeys | None) -> SubscriptionManager:
        return SubscriptionManager(h.settings, h.subscriptions, api, h.accounts, h.queue, clock=rig.now,
                                   keys=with_keys)

    account = rig.link(0)
    basic = rig.manager.ensure(account)
    assert basic is not None and basic.subscription_id is not None
    upgraded = manager(keys).renew(account)
    assert upgraded is not None and upgraded.subscription_id not in (None, basic.subscription_id)
    assert rig.at_graph(basic.subscription_id) is None                 # the basic one is gone
    at_graph = rig.at_graph(upgraded.subscription_id)  # type: ignore[arg-type]
    assert at_graph is not None and at_graph["resource"] == f"me/messages?$select={MESSAGE_SELECT}"
    assert at_graph["includeResourceData"] is True
    assert at_graph["encryptionCertificateId"] == keys.current.certificate_id
    h.drain()

    rig.change(account)
    assert rig.wait_pending(account)
    pending = h.pending.get(account)
    assert pending is not None
    inbox = rig.client_for(account).get("me/mailFolders/inbox", params={"$select": "id"})["id"]
    [(created, message_id)] = pending.changes
    assert created == "created" and dict(pending.folders) == {message_id: inbox}

    rotated = NotificationKeys([*parse_certificates(new_certificate_pem("next")), keys.current])
    assert rotated.current.certificate_id != keys.current.certificate_id
    renewed = manager(rotated).renew(account)
    assert renewed is not None and renewed.subscription_id == upgraded.subscription_id
    after = rig.at_graph(upgraded.subscription_id)  # type: ignore[arg-type]
    assert after is not None and after["encryptionCertificateId"] == rotated.current.certificate_id


def test_a_subscription_made_with_the_folder_only_select_is_replaced_at_its_renewal(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the notified states the messages subscription selected ``parentFolderId`` alone. Graph cannot
    change a resource, so its renewal makes a new subscription with today's $select (and deletes the old)."""
    keys = load_notification_keys(Settings.from_env({"GRAPH_SANDBOX_URL": rig.sandbox.base_url,
                                                     "MAILSYNC_LOCAL_DIR": str(tmp_path)}))
    assert keys is not None
    h = rig.harness
    manager = SubscriptionManager(h.settings, h.subscriptions, GraphSubscriptionApi(rig.client_for), h.accounts,
                                  h.queue, clock=rig.now, keys=keys)
    account = rig.link(0)
    with monkeypatch.context() as patched:
        patched.setattr(subscriptions_module, "MESSAGE_SELECT", FOLDER_ONLY_SELECT)
        old = manager.ensure(account)
    assert old is not None and old.subscription_id is not None
    old_at_graph = rig.at_graph(old.subscription_id)
    assert old_at_graph is not None and old_at_graph["resource"] == "me/messages?$select=parentFolderId"
    renewed = manager.renew(account)
    assert renewed is not None and renewed.subscription_id not in (None, old.subscription_id)
    assert rig.at_graph(old.subscription_id) is None
    at_graph = rig.at_graph(renewed.subscription_id)  # type: ignore[arg-type]
    assert at_graph is not None and at_graph["resource"] == f"me/messages?$select={MESSAGE_SELECT}"
    again = manager.renew(account)
    assert again is not None and again.subscription_id == renewed.subscription_id, "renewed in place from then on"
