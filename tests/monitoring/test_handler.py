"""The NOTIFIED / SYNC_ACCOUNT jobs: notifications → folders, against Azurite, the search node and the sandbox.

Message ids and folders come from a sandbox mailbox (its ground-truth
snapshot); the store holds part of them, as it would mid-sync; folder
lookups go to the sandbox over HTTP. The sandbox's request counter shows
which resolutions cost a Graph call.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence

import pytest

from graph_sandbox.rich_notifications import EncryptionCertificate, encrypted_content, validation_token
from graph_sandbox.tokens import TokenSigner
from mailsync.auth.published_keys import SigningKeys
from mailsync.jobs import EVERY_FOLDER, EXPECT, TAKE_PENDING, Expected, JobKind
from mailsync.models import Account, Folder, Job, Message, SyncPhase
from mailsync.monitoring.graph_api import GraphMessageLocator, GraphSubscriptionApi
from mailsync.monitoring.handler import DirectRunner, MonitoringJobs
from mailsync.monitoring.notifications import NotificationReceiver
from mailsync.monitoring.recent_accounts import RecentAccounts
from mailsync.monitoring.resource_data import NotificationKeys, new_certificate_pem, parse_certificates
from mailsync.monitoring.subscriptions import SubscriptionManager
from mailsync.monitoring.validation_tokens import ValidationTokens
from mailsync.providers.graph_client import GraphClient
from mailsync.storage.sync_rows import AccountSyncState, SyncState
from mailsync.store.search_store import SearchStore
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.monitoring.harness import Harness, change, make_harness


class World:
    """One linked account whose mailbox is a sandbox user's, half of it in the store."""

    def __init__(self, harness: Harness, store: SearchStore, sandbox: SandboxTestServer) -> None:
        self.harness = harness
        self.store = store
        self.sandbox = sandbox
        self.user = sandbox.users[0]
        self.account = harness.add_account()
        self.subscription, self.client_state = harness.add_subscription(self.account, signed=True)
        snap = sandbox.snapshot(self.user)
        self.folders = {f["id"]: f for f in snap["folders"]}
        self.inbox = next(f["id"] for f in snap["folders"] if f["wellKnownName"] == "inbox")
        self.messages = snap["messages"]
        store.upsert_folders([Folder(self.account, f["id"], f["displayName"]) for f in snap["folders"]])
        # The folder-list round writes a folder's store document and its sync row together.
        harness.sync_rows.create_many([SyncState(self.account, None, phase=SyncPhase.INCREMENTAL, epoch=1),
                                       *(SyncState(self.account, f["id"], phase=SyncPhase.INCREMENTAL, epoch=1)
                                         for f in snap["folders"])])
        self.stored = self.messages[::2]
        self.unstored = self.messages[1::2]
        store.upsert_messages([Message(self.account, m["id"], m["folderId"], version=1) for m in self.stored])
        store.refresh()
        self.locator = GraphMessageLocator(self.client_for)
        manager = SubscriptionManager(harness.settings, harness.subscriptions, GraphSubscriptionApi(self.client_for),
                                      harness.accounts, harness.queue)
        self.jobs = MonitoringJobs(harness.pending, harness.accounts, store, self.locator, manager, harness.queue,
                                   rows=harness.sync_rows.load)

    def client_for(self, account_id: str) -> GraphClient:
        assert account_id == self.account
        token = self.sandbox.user_token(self.user.mail)
        return GraphClient(lambda _force: token, base_url=f"{self.sandbox.base_url}/v1.0")

    def runner(self, record: Callable[[Job, Account, AccountSyncState | None], object]) -> DirectRunner:
        """A direct runner standing in for the engine: it takes the pending row as a NOTIFIED job's first
        round does (``TAKE_PENDING``: with its slot and lease, before it reads the mailbox), then records."""
        def run(job: Job, account: Account, rows: AccountSyncState | None) -> AccountSyncState | None:
            etag = job.attrs.get(TAKE_PENDING)
            if etag:
                self.harness.sync_rows.take_pending(job.account_id, etag)
            result = record(job, account, rows)
            return result if isinstance(result, AccountSyncState) else None
        return run

    def notify(self, *changes: tuple[str, str]) -> None:
        self.harness.notifications.receive(
            {"value": [change(self.subscription, self.client_state, mid, ct) for ct, mid in changes]})

    def notify_versions(self, *changes: tuple[str, str, str]) -> None:
        """Notifications carrying the changed version, as Outlook's do (resourceData's ``@odata.etag``)."""
        self.harness.notifications.receive(
            {"value": [change(self.subscription, self.client_state, mid, ct, tag) for ct, mid, tag in changes]})

    def graph_requests(self) -> int:
        return int(self.sandbox.admin("GET", "counters").json()["requests"])

    def run(self) -> list[tuple[str, str | None]]:
        self.harness.drain()
        sent = self.jobs.notified(self.account)
        return sorted((job.kind, job.folder_id) for job in sent)


@pytest.fixture
def world(storage_env: dict[str, str], store: SearchStore,
          sandbox_factory: Callable[..., SandboxTestServer]) -> World:
    sandbox = sandbox_factory(users=1, messages_per_user=40)
    return World(make_harness(storage_env, NOTIFY_COALESCE_S="0"), store, sandbox)


def sync(folder: str) -> tuple[str, str]:
    return (JobKind.SYNC_FOLDER.value, folder)


def test_stored_updates_and_deletes_resolve_from_the_store_without_graph(world: World) -> None:
    a, b = world.stored[0], world.stored[-1]
    before = world.graph_requests()
    world.notify(("updated", a["id"]), ("deleted", b["id"]))
    jobs = world.run()
    assert world.graph_requests() == before
    assert jobs == sorted({sync(a["folderId"]), sync(b["folderId"])})
    assert world.harness.pending.get(world.account) is None


def test_a_small_set_runs_in_the_invocation_without_a_queue_hop(world: World) -> None:
    a, b = world.stored[0], world.stored[-1]
    world.notify(("updated", a["id"]), ("deleted", b["id"]))
    world.harness.drain()
    ran: list[Job] = []
    sent = world.jobs.notified(world.account, direct=world.runner(lambda job, account, rows: ran.append(job)))
    assert ran == sent
    assert sorted((job.kind, job.folder_id) for job in ran) == sorted({sync(a["folderId"]), sync(b["folderId"])})
    assert world.harness.drain() == []                 # nothing went through the queue
    assert world.harness.pending.get(world.account) is None


def test_the_pending_row_comes_with_the_first_rounds_rows_in_one_read(world: World) -> None:
    # The row shares the account's sync partition: the job's one query reads it and the rows
    # its first round starts from (that round then reads nothing before taking its slot).
    a = world.stored[0]
    b = next(m for m in world.stored if m["folderId"] != a["folderId"])
    world.notify(("updated", a["id"]), ("deleted", b["id"]))
    world.harness.drain()
    loads: list[str] = []

    def load(account_id: str) -> AccountSyncState:
        loads.append(account_id)
        return world.harness.sync_rows.load(account_id)

    class NoPointReads:
        def __getattr__(self, name: str) -> object:
            assert name != "get", "the pending row was read on its own"
            return getattr(world.harness.pending, name)

    jobs = MonitoringJobs(NoPointReads(), world.harness.accounts, world.store, world.locator,  # type: ignore[arg-type]
                          world.jobs._subscriptions, world.harness.queue, rows=load)
    given: list[AccountSyncState | None] = []
    sent = jobs.notified(world.account, direct=world.runner(lambda job, account, rows: given.append(rows)))
    assert len(sent) == 2 and loads == [world.account]
    first, second = given
    assert first is not None and first.account_id == world.account and first.folder_list is not None
    assert second is None                      # later rounds read rows written by the first
    assert world.harness.pending.get(world.account) is None


def test_each_round_run_in_the_invocation_starts_from_the_rows_the_one_before_ended_with(world: World) -> None:
    a = world.stored[0]
    b = next(m for m in world.stored if m["folderId"] != a["folderId"])
    world.notify(("updated", a["id"]), ("deleted", b["id"]))
    world.harness.drain()
    given: list[AccountSyncState | None] = []
    ended: list[AccountSyncState] = []

    def direct(job: Job, account: Account, rows: AccountSyncState | None) -> AccountSyncState:
        given.append(rows)
        ended.append(world.harness.sync_rows.load(job.account_id))   # what a round would end with
        return ended[-1]

    assert len(world.jobs.notified(world.account, world.runner(direct))) == 2
    assert given[0] is not None and given[1] is ended[0], "the second round starts where the first ended"


def test_rounds_run_in_the_invocation_carry_the_versions_and_removals_they_must_read(world: World) -> None:
    flagged = world.stored[0]
    moved = next(m for m in world.stored if m["folderId"] != flagged["folderId"])
    target = next(f for f in world.folders if f not in (flagged["folderId"], moved["folderId"])
                  and world.folders[f]["wellKnownName"] not in ("outbox", "drafts", None))
    untagged = next((m for m in world.stored if m["folderId"] not in (flagged["folderId"], moved["folderId"], target)),
                    None)
    world.sandbox.graph(world.user).post(f"me/messages/{moved['id']}/move", json={"destinationId": target})
    notes = [("updated", flagged["id"], 'W/"kf"'), ("deleted", moved["id"], None), ("created", moved["id"], 'W/"km"')]
    if untagged is not None:
        notes.append(("updated", untagged["id"], None))     # no version: its folder looks again as before
    world.harness.notifications.receive(
        {"value": [change(world.subscription, world.client_state, mid, ct, tag) for ct, mid, tag in notes]})
    world.harness.drain()
    ran: list[Job] = []
    world.jobs.notified(world.account, direct=world.runner(lambda job, account, rows: ran.append(job)))
    expected = {job.folder_id: Expected.decode(job.attrs.get(EXPECT)) for job in ran}
    assert expected[flagged["folderId"]] == Expected({flagged["id"]: 'W/"kf"'})
    assert expected[moved["folderId"]] == Expected({}, frozenset({moved["id"]}))   # it must be read leaving
    assert expected[target] == Expected({moved["id"]: 'W/"km"'})
    if untagged is not None:
        assert expected[untagged["folderId"]] is None
    # Queued jobs never carry it (a queue message could not hold a large set): only rounds run here do.
    world.notify(("updated", flagged["id"]))
    world.harness.drain()
    assert all(EXPECT not in job.attrs for job in world.jobs.notified(world.account))


def test_a_notified_job_reuses_its_processs_recent_read_of_a_linked_account(world: World) -> None:
    # The account row was read for every NOTIFIED job; its sync rows, read with the pending row, show
    # it still linked, so this process's read of a moment ago does (mailsync.monitoring.recent_accounts).
    reads: list[str] = []

    class CountingAccounts:
        def get(self, account_id: str) -> Account | None:
            reads.append(account_id)
            return world.harness.accounts.get(account_id)  # type: ignore[no-any-return]

        def iter_accounts(self) -> object:
            return world.harness.accounts.iter_accounts()

    counting = CountingAccounts()
    jobs = MonitoringJobs(world.harness.pending, counting, world.store, world.locator,  # type: ignore[arg-type]
                          world.jobs._subscriptions, world.harness.queue, rows=world.harness.sync_rows.load,
                          recent=RecentAccounts(counting))  # type: ignore[arg-type]
    message = world.stored[0]
    for _ in range(3):
        world.notify(("updated", message["id"]))
        world.harness.drain()
        assert jobs.notified(world.account, direct=world.runner(lambda job, account, rows: None)) != []
    assert reads == [world.account], "one account read for three jobs"
    # Its sync rows gone (an unlink deletes them before the account row): the account is read again.
    world.harness.sync_rows.delete(world.account, None)
    world.notify(("updated", message["id"]))
    world.harness.drain()
    jobs.notified(world.account, direct=world.runner(lambda job, account, rows: None))
    assert reads == [world.account] * 2


def test_notifications_the_store_resolves_are_taken_by_the_first_round_and_others_before_the_lookups(
        world: World) -> None:
    # Updates of stored messages: no mailbox read before the rounds, so the first round takes the row
    # with its slot and lease (one table transaction for both).
    message = world.stored[0]
    world.notify(("updated", message["id"]))
    world.harness.drain()
    seen: list[tuple[Job, bool]] = []
    world.jobs.notified(world.account, direct=lambda job, account, rows: seen.append(
        (job, world.harness.pending.get(world.account) is not None)))
    [(job, still_pending)] = seen
    assert still_pending and job.attrs.get(TAKE_PENDING), "left for the round to take"
    # New mail: looked up at Graph, so the row is taken before that read.
    world.harness.sync_rows.take_pending(world.account, job.attrs[TAKE_PENDING])
    world.notify(("created", world.unstored[0]["id"]))
    world.harness.drain()
    seen.clear()
    world.jobs.notified(world.account, direct=lambda job, account, rows: seen.append(
        (job, world.harness.pending.get(world.account) is not None)))
    [(job, still_pending)] = seen
    assert not still_pending and TAKE_PENDING not in job.attrs


def test_lookups_of_versioned_notifications_leave_the_take_to_the_first_round(world: World) -> None:
    # New mail whose notification names its version: a change to it while the row is pending would
    # carry another version and rewrite the row, so the lookup may come before the take and the take
    # rides in the first round's transaction (one table call less).
    world.notify_versions(("created", world.unstored[0]["id"], 'W/"v1"'))
    world.harness.drain()
    seen: list[tuple[Job, bool]] = []
    world.jobs.notified(world.account, direct=world.runner(lambda job, account, rows: seen.append(
        (job, world.harness.pending.get(world.account) is not None))))
    [(job, _)] = seen
    assert job.attrs.get(TAKE_PENDING), "left for the round to take"
    assert (job.kind, job.folder_id) == sync(world.unstored[0]["folderId"])
    assert world.harness.pending.get(world.account) is None and world.harness.drain() == []


def test_a_looked_up_message_changed_before_the_round_took_the_row_is_resolved_again(world: World) -> None:
    moved = world.unstored[0]
    target = next(f for f in world.folders if f != moved["folderId"]
                  and world.folders[f]["wellKnownName"] not in ("outbox", "drafts", None))

    class MovingLocator:
        """The message moves (and its notification lands) right after the first lookup answered."""

        def __init__(self, inner: GraphMessageLocator) -> None:
            self.inner = inner
            self.calls = 0

        def parent_folders(self, account_id: str, message_ids: Sequence[str]) -> Mapping[str, str | None]:
            self.calls += 1
            found = self.inner.parent_folders(account_id, message_ids)
            if self.calls == 1:
                world.sandbox.graph(world.user).post(f"me/messages/{moved['id']}/move", json={"destinationId": target})
                world.notify_versions(("updated", moved["id"], 'W/"v2"'))
            return found

    locator = MovingLocator(world.locator)
    world.jobs._locator = locator  # type: ignore[assignment]
    world.notify_versions(("updated", moved["id"], 'W/"v1"'))
    world.harness.drain()
    ran: list[Job] = []
    world.jobs.notified(world.account, direct=world.runner(lambda job, account, rows: ran.append(job)))
    # The first round's take was refused (the row changed): nothing read, the job looked again.
    assert locator.calls == 2
    assert [(job.kind, job.folder_id) for job in ran] == [sync(target)]
    assert world.harness.pending.get(world.account) is None and world.harness.drain() == []


def test_notifications_merged_before_the_round_took_them_are_read_again(world: World) -> None:
    a, b = world.stored[0], world.stored[1]
    world.notify(("updated", a["id"]))
    world.harness.drain()
    rounds: list[Job] = []

    def direct(job: Job, account: Account, rows: AccountSyncState | None) -> None:
        if not rounds:
            world.notify(("updated", b["id"]))      # merged after the job read the row
        rounds.append(job)
        if TAKE_PENDING in job.attrs:
            world.harness.sync_rows.take_pending(job.account_id, job.attrs[TAKE_PENDING])   # as the round does
    world.jobs.notified(world.account, direct)
    assert len(rounds) >= 2, "the first take was refused: the job read the row again"
    assert world.harness.pending.get(world.account) is None
    assert {job.folder_id for job in rounds[1:]} == {a["folderId"], b["folderId"]}


def test_a_large_set_is_enqueued_for_several_workers_even_with_a_direct_runner(world: World) -> None:
    ids = [m["id"] for m in world.messages]
    for start in range(0, 150, 50):
        world.notify(*(("updated", f"{mid}x{start}") for mid in ids[:50]))
    world.harness.drain()
    ran: list[Job] = []
    world.jobs.notified(world.account, direct=world.runner(lambda job, account, rows: ran.append(job)))
    assert ran == []
    assert len(world.harness.drain()) == len(world.folders) + 1


def test_created_and_unknown_ids_are_located_at_graph_one_request_each(world: World) -> None:
    delivered = world.sandbox.admin("POST", f"mailboxes/{world.user.id}/deliver", json={"count": 1}).json()
    new_id = delivered["delivered"][0]["id"]
    unknown = world.unstored[0]
    moved = world.stored[1]          # a move: created in the target, and the store still names the source
    target = next(f for f in world.folders if f not in (moved["folderId"],) and world.folders[f]["wellKnownName"]
                  not in ("outbox", "drafts", None))
    world.sandbox.graph(world.user).post(f"me/messages/{moved['id']}/move", json={"destinationId": target})
    world.notify(("created", new_id), ("updated", unknown["id"]), ("created", moved["id"]), ("deleted", moved["id"]))
    before = world.graph_requests()
    jobs = world.run()
    assert world.graph_requests() - before == 3      # the new mail, the unknown id, the moved one
    assert jobs == sorted({sync(world.inbox), sync(unknown["folderId"]), sync(moved["folderId"]), sync(target)})


def test_new_and_moved_mail_whose_notifications_carry_the_folder_need_no_lookup(world: World) -> None:
    """Rich notifications: the webhook decrypted each created message's parentFolderId into the row, so the
    job asks Graph nothing, sends each round what it must read, and leaves the take to the first round."""
    keys = NotificationKeys(parse_certificates(new_certificate_pem("test")))
    identity = TokenSigner()
    app = world.harness.settings.ms_client_id
    assert app is not None
    h = world.harness
    receiver = NotificationReceiver(h.settings, h.subscriptions, h.accounts, h.pending, h.queue,
                                    client_states=h.signer, keys=keys,
                                    tokens=ValidationTokens(app, SigningKeys(identity.jwks)))
    certificate = EncryptionCertificate(keys.current.certificate_id, base64.b64decode(keys.current.certificate))
    delivered = world.sandbox.admin("POST", f"mailboxes/{world.user.id}/deliver", json={"count": 1}).json()
    new_id = delivered["delivered"][0]["id"]
    moved = world.stored[1]
    target = next(f for f in world.folders if f != moved["folderId"]
                  and world.folders[f]["wellKnownName"] not in ("outbox", "drafts", None))
    world.sandbox.graph(world.user).post(f"me/messages/{moved['id']}/move", json={"destinationId": target})

    def created(message_id: str, folder: str, tag: str) -> dict[str, object]:
        item = change(world.subscription, world.client_state, message_id, "created", tag)
        item["encryptedContent"] = encrypted_content({"id": message_id, "parentFolderId": folder}, certificate)
        return item

    token = validation_token(identity, app_id=app, tenant_id="t", now=time.time())
    receiver.receive({"value": [created(new_id, world.inbox, 'W/"kn"'),
                                change(world.subscription, world.client_state, moved["id"], "deleted"),
                                created(moved["id"], target, 'W/"km"')], "validationTokens": [token]})
    h.drain()
    before = world.graph_requests()
    ran: list[Job] = []
    world.jobs.notified(world.account, direct=world.runner(lambda job, account, rows: ran.append(job)))
    assert world.graph_requests() == before                  # no GET messages/{id}
    assert sorted((job.kind, job.folder_id) for job in ran) == sorted(
        {sync(world.inbox), sync(moved["folderId"]), sync(target)})
    assert ran[0].attrs.get(TAKE_PENDING), "nothing read the mailbox before the rounds: the first round takes the row"
    expected = {job.folder_id: Expected.decode(job.attrs.get(EXPECT)) for job in ran}
    assert expected[world.inbox] == Expected({new_id: 'W/"kn"'})
    assert expected[moved["folderId"]] == Expected({}, frozenset({moved["id"]}))
    assert expected[target] == Expected({moved["id"]: 'W/"km"'})
    assert h.pending.get(world.account) is None


def test_a_job_whose_newest_notification_is_inside_the_learnt_lag_waits_until_it_settled(world: World) -> None:
    """Settling: a short wait is slept in the invocation (nothing held, the row not yet taken); a longer one
    puts the job back on the queue, the row staying pending (still the gate); either way only once."""
    h = world.harness
    slept: list[float] = []

    def jobs_with_lag(lag_s: float) -> MonitoringJobs:
        manager = SubscriptionManager(h.settings, h.subscriptions, GraphSubscriptionApi(world.client_for),
                                      h.accounts, h.queue)
        return MonitoringJobs(h.pending, h.accounts, world.store, world.locator, manager, h.queue,
                              rows=h.sync_rows.load, lag=lambda: lag_s, sleep=slept.append)

    ran: list[Job] = []
    runner = world.runner(lambda job, account, rows: ran.append(job))
    message = world.stored[0]
    # Within a second: slept in place, then resolved and synced in the same run; no queue message.
    world.notify_versions(("updated", message["id"], 'W/"k0"'))
    h.drain()
    jobs_with_lag(1.0).notified(world.account, direct=runner)
    assert len(slept) == 1 and 0 < slept[0] <= 1.0
    assert [job.folder_id for job in ran] == [message["folderId"]] and h.drain() == []
    # Longer: back on the queue, the row left pending; the job it sent does not settle again.
    ran.clear()
    world.notify_versions(("updated", message["id"], 'W/"k1"'))
    [notified] = h.drain()
    before = world.graph_requests()
    lagging = jobs_with_lag(2.0)
    assert lagging.notified(world.account, direct=runner) == []
    assert ran == [] and world.graph_requests() == before and len(slept) == 1
    assert h.pending.get(world.account) is not None, "the row stays, the gate for later notifications"
    assert h.drain() == [] and h.queued_count() == 1                 # delayed (the queue's whole seconds)
    [settle] = h.drain(wait_s=2.5)
    assert (settle.kind, settle.reason) == (JobKind.NOTIFIED.value, "settle") and notified.reason == "webhook"
    world.notify_versions(("updated", world.stored[2]["id"], 'W/"k2"'))     # still arriving: no second wait
    h.drain()
    lagging.run(settle, direct=runner)
    assert {job.folder_id for job in ran} == {message["folderId"], world.stored[2]["folderId"]}
    assert h.pending.get(world.account) is None and len(slept) == 1
    # Without a learnt lag (the provider's delta showed what its notifications announced): no settling.
    world.notify_versions(("updated", message["id"], 'W/"k3"'))
    h.drain()
    ran.clear()
    world.jobs.notified(world.account, direct=runner)
    assert [job.folder_id for job in ran] == [message["folderId"]] and len(slept) == 1


def test_an_overflowing_row_syncs_the_folder_list_and_every_folder(world: World) -> None:
    ids = [m["id"] for m in world.messages]
    for start in range(0, 150, 50):
        world.notify(*(("updated", f"{mid}x{start}") for mid in ids[:50]))
    before = world.graph_requests()
    jobs = world.run()
    assert world.graph_requests() == before
    assert jobs == sorted([(JobKind.SYNC_FOLDERS.value, None), *(sync(f) for f in world.folders)])


def test_more_lookups_than_folders_syncs_every_folder_instead(world: World) -> None:
    assert len(world.messages) > len(world.folders)
    world.notify(*(("created", m["id"]) for m in world.messages[:len(world.folders) + 1]))
    before = world.graph_requests()
    jobs = world.run()
    assert world.graph_requests() == before
    assert (JobKind.SYNC_FOLDERS.value, None) in jobs and len(jobs) == len(world.folders) + 1


def test_failing_lookups_fall_back_to_every_folder(world: World) -> None:
    world.notify(("created", world.unstored[0]["id"]))
    assert world.sandbox.admin("PUT", "faults", json={"profile": "none", "overrides": {"error_503": 1.0}}).ok
    try:
        jobs = world.run()
    finally:
        world.sandbox.admin("PUT", "faults", json={"profile": "none"})
    assert jobs == sorted([(JobKind.SYNC_FOLDERS.value, None), *(sync(f) for f in world.folders)])


def test_a_new_folder_also_syncs_the_folder_list(world: World) -> None:
    graph = world.sandbox.graph(world.user)
    folder = graph.post("me/mailFolders", json={"displayName": "Fresh"}).json()["id"]
    message = world.stored[0]
    graph.post(f"me/messages/{message['id']}/move", json={"destinationId": folder})
    world.notify(("created", message["id"]))
    jobs = world.run()
    assert (JobKind.SYNC_FOLDERS.value, None) in jobs and sync(folder) in jobs


def folder_change(subscription_id: str, client_state: str, folder_id: str, change_type: str) -> dict[str, object]:
    """A me/mailFolders changeNotification, as the sandbox (and Outlook) sends it."""
    resource = f"Users/u/MailFolders/{folder_id}"
    return {"id": "7a3e2f4c-0000-4000-8000-000000000001", "subscriptionId": subscription_id,
            "subscriptionExpirationDateTime": "2026-11-27T10:00:00.0000000Z", "changeType": change_type,
            "resource": resource, "clientState": client_state, "tenantId": "t",
            "resourceData": {"@odata.type": "#Microsoft.Graph.MailFolder", "@odata.id": resource, "id": folder_id}}


def test_a_folder_notification_is_one_folder_list_round(world: World) -> None:
    folders_sub = world.harness.add_subscription(world.account, resource="me/mailFolders", signed=True)
    body = {"value": [folder_change(*folders_sub, world.inbox, "updated"),
                      folder_change(*folders_sub, world.inbox, "created")]}
    report = world.harness.notifications.receive(body)
    assert (report.accepted, report.dropped, report.jobs_enqueued) == (2, 0, 1)
    assert world.harness.notifications.receive(body).jobs_enqueued == 0       # merges into the row
    pending = world.harness.pending.get(world.account)
    assert pending is not None and pending.folder_notices == 4 and pending.changes == ()
    before = world.graph_requests()
    assert world.run() == [(JobKind.SYNC_FOLDERS.value, None)]
    assert world.graph_requests() == before
    # A message change in the same row keeps its own folder sync beside the folder list.
    message = world.stored[0]
    world.notify(("updated", message["id"]))
    world.harness.notifications.receive({"value": [folder_change(*folders_sub, world.inbox, "deleted")]})
    assert world.run() == sorted([(JobKind.SYNC_FOLDERS.value, None), sync(message["folderId"])])


def test_a_folder_notice_during_the_folder_round_gets_another_job(world: World) -> None:
    # A folder notice says nothing that tells a second rename from a replay, and the
    # job has read the folder list once its round runs: the notice must bring another round.
    folders_sub = world.harness.add_subscription(world.account, resource="me/mailFolders", signed=True)
    notice = {"value": [folder_change(*folders_sub, world.inbox, "updated")]}
    world.harness.notifications.receive(notice)
    world.harness.drain()
    rounds: list[str] = []

    def direct(job: Job, account: Account, rows: AccountSyncState | None) -> None:
        rounds.append(job.kind)
        if len(rounds) == 1:
            assert world.harness.notifications.receive(notice).jobs_enqueued == 1
    world.jobs.notified(world.account, world.runner(direct))
    assert rounds == [JobKind.SYNC_FOLDERS.value]
    assert [job.kind for job in world.harness.drain()] == [JobKind.NOTIFIED.value]
    world.jobs.notified(world.account, world.runner(direct))
    assert rounds == [JobKind.SYNC_FOLDERS.value, JobKind.SYNC_FOLDERS.value]
    assert world.harness.pending.get(world.account) is None


def test_a_repeat_of_a_pending_notification_after_the_job_took_it_gets_another_look(world: World) -> None:
    # The lost change: message X changes, its notification is pending, the job syncs X's
    # folder; X changes again during that round and Graph sends the very same notification.
    # It must not be taken for a replay of the pending one: it needs another round.
    message = world.stored[0]
    repeat = ("updated", message["id"])
    world.notify(repeat)
    world.harness.drain()
    rounds: list[Job] = []

    def direct(job: Job, account: Account, rows: AccountSyncState | None) -> None:
        rounds.append(job)
        if len(rounds) == 1:          # the round has started: the mailbox is being read
            world.notify(repeat)
    world.jobs.notified(world.account, world.runner(direct))
    assert [(job.kind, job.folder_id) for job in rounds] == [sync(message["folderId"])]
    assert [job.kind for job in world.harness.drain()] == [JobKind.NOTIFIED.value]
    pending = world.harness.pending.get(world.account)
    assert pending is not None and pending.changes == (repeat,)
    world.jobs.notified(world.account, world.runner(direct))
    assert [(job.kind, job.folder_id) for job in rounds] == [sync(message["folderId"])] * 2


def test_notifications_arriving_while_the_job_runs_get_a_job_of_their_own(world: World) -> None:
    late = world.stored[3]

    class NotifyingLocator:
        """Lets a webhook request land after the job took the row (deterministically)."""

        def __init__(self, inner: GraphMessageLocator) -> None:
            self.inner = inner
            self.calls = 0

        def parent_folders(self, account_id: str, message_ids: Sequence[str]) -> Mapping[str, str | None]:
            self.calls += 1
            if self.calls == 1:
                world.notify(("updated", late["id"]))
            return self.inner.parent_folders(account_id, message_ids)

    world.jobs._locator = NotifyingLocator(world.locator)  # type: ignore[assignment]
    world.notify(("created", world.unstored[0]["id"]))
    assert world.run() == [sync(world.unstored[0]["folderId"])]
    queued = sorted((job.kind, job.folder_id) for job in world.harness.drain())
    assert queued == sorted([(JobKind.NOTIFIED.value, None), sync(world.unstored[0]["folderId"])])
    assert [(job.kind, job.folder_id) for job in world.jobs.notified(world.account)] == [sync(late["folderId"])]
    assert world.harness.pending.get(world.account) is None


def test_a_redelivered_job_whose_row_was_taken_syncs_every_folder(world: World) -> None:
    # The first delivery took the row and died mid-round: what the row named is gone,
    # so the redelivery syncs the folder list and every folder rather than nothing.
    world.notify(("updated", world.stored[0]["id"]))
    world.harness.drain()

    def dies(job: Job, account: Account, rows: AccountSyncState | None) -> None:
        raise RuntimeError("the host went away mid-round")
    with pytest.raises(RuntimeError):
        world.jobs.notified(world.account, world.runner(dies))
    assert world.harness.pending.get(world.account) is None
    ran: list[Job] = []
    world.jobs.notified(world.account, world.runner(lambda job, account, rows: ran.append(job)), redelivered=True)
    assert [(job.kind, job.folder_id, job.attrs) for job in ran] == [
        (JobKind.SYNC_FOLDERS.value, None, {EVERY_FOLDER: "1"})]


def test_a_duplicate_job_finds_nothing_to_do(world: World) -> None:
    world.notify(("updated", world.stored[0]["id"]))
    assert world.run()
    assert world.run() == []


def test_a_deleted_account_gets_no_jobs_and_its_row_goes(world: World) -> None:
    world.notify(("updated", world.stored[0]["id"]))
    world.harness.accounts.delete(world.account)
    assert world.run() == []
    assert world.harness.pending.get(world.account) is None


def test_a_signed_notification_for_a_deleted_account_is_dropped_by_its_job_and_leaves_no_row(world: World) -> None:
    # The webhook reads no account for a signed clientState; the job, which reads it anyway, drops the work.
    world.harness.accounts.delete(world.account)
    world.notify(("updated", world.stored[0]["id"]))
    assert world.harness.pending.get(world.account) is not None
    assert world.run() == []
    assert world.harness.pending.get(world.account) is None


def test_sync_account_is_one_folder_list_job_for_every_folder(world: World) -> None:
    sent = world.jobs.sync_account(world.account, reason="poll")
    assert [(j.kind, j.folder_id, j.reason, j.attrs) for j in sent] == [
        (JobKind.SYNC_FOLDERS.value, None, "poll", {EVERY_FOLDER: "1"})]
    assert world.harness.drain() == sent
