"""IMAP change monitoring against Dovecot: the STATUS poller and the IDLE/NOTIFY listener.

Poller: after a complete sync a tick enqueues nothing; a flag change, new
mail, an expunge, a new folder or a new UIDVALIDITY each enqueue exactly
the job that picks it up; a refused login hands the account to the engine;
an unreachable server is counted, not raised. Listener: a change in any
folder becomes a job (NOTIFY on Dovecot; one IDLE per folder on a server
without NOTIFY); folder-list changes become SYNC_FOLDERS. No timed
assertions: latency is measured by bench/imap_initial_sync.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest

from mailsync.errors import ProviderUnavailable
from mailsync.jobs import JobKind
from mailsync.models import Account, AccountStatus, Job, Provider
from mailsync.monitoring.imap_poll import ImapStatusPoller
from mailsync.providers.imap_listener import ImapListener
from mailsync.providers.imap_session import ImapEndpoint, ImapSession
from mailsync.settings import Settings
from mailsync.storage.sync_rows import AccountSyncState, SyncState
from tests.fixtures.dovecot import DovecotServer, loopback_policy, rfc822
from tests.providers.contract import Mirror
from tests.providers.imap_harness import ImapHarness, make_harness


@dataclass
class ListQueue:
    jobs: list[Job] = field(default_factory=list)

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        self.jobs.append(job)

    def kinds(self) -> list[tuple[str, str | None]]:
        return sorted((j.kind, j.folder_id) for j in self.jobs)


@dataclass
class Synced:
    """The sync rows the engine would have after a complete round (cursors from a real provider round)."""

    harness: ImapHarness
    mirror: Mirror = field(default_factory=Mirror)

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        provider = self.harness.open(page_size=500)
        self.mirror.sync(provider)
        provider.close()

    def load(self, account_id: str) -> AccountSyncState:
        folders = {fid: SyncState(account_id=account_id, folder_id=fid, cursor=cursor, rounds=1)
                   for fid, cursor in self.mirror.cursors.items()}
        return AccountSyncState(account_id, SyncState(account_id=account_id, folder_id=None, rounds=1), folders, 0)


def account(harness: ImapHarness) -> Account:
    now = datetime.now(UTC)
    return Account(account_id=harness.account_id, provider=Provider.IMAP, status=AccountStatus.SYNCED,
                   access_token_hash="x", created_at=now, updated_at=now)


@dataclass
class Accounts:
    items: list[Account]

    def iter_accounts(self) -> Iterator[Account]:
        return iter(self.items)


def poller(harness: ImapHarness, rows: Synced, queue: ListQueue,
           connect: Callable[[str], ImapSession] | None = None) -> ImapStatusPoller:
    return ImapStatusPoller(Accounts([account(harness)]), rows, connect or (lambda _id: harness.connect()), queue)


def test_a_quiet_mailbox_costs_no_job(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    queue = ListQueue()
    report = poller(harness, Synced(harness), queue).tick()
    assert report.accounts == 1 and report.folders >= 6 and report.errors == 0
    assert queue.jobs == []


@dataclass
class CountedRows(Synced):
    """``Synced`` that counts its reads (a read of the account's sync rows: one table call)."""

    reads: int = 0

    def load(self, account_id: str) -> AccountSyncState:
        self.reads += 1
        return super().load(account_id)


def settled(poll: ImapStatusPoller, rows: CountedRows) -> int:
    """Tick until a tick reads no rows; the reads so far. (The answer may move once more right after a
    sync, whose own session is still being indexed: that tick reads the rows, finds them in step, and
    remembers the new answer.)"""
    for _ in range(5):
        before = rows.reads
        poll.tick()
        if rows.reads == before:
            return before
    raise AssertionError("every tick read the rows")


def test_a_quiet_account_is_polled_without_reading_its_rows_and_its_changes_still_come(
        dovecot: DovecotServer) -> None:
    # At rest a tick read every IMAP account's sync rows: 1,440 table calls a day per account.
    harness = make_harness(dovecot)
    rows = CountedRows(harness)
    queue = ListQueue()
    poll = poller(harness, rows, queue)
    poll.tick()
    reads = settled(poll, rows)
    for _ in range(3):
        poll.tick()
    assert rows.reads == reads and queue.jobs == [], "the server answers as when the rows were in step with it"
    harness.deliver("new")
    poll.tick()
    assert rows.reads == reads + 1 and queue.kinds() == [(JobKind.SYNC_FOLDER.value, "INBOX")]
    queue.jobs.clear()
    poll.tick()    # the job has not run yet: the rows still lag the server, and are read again
    assert rows.reads == reads + 2 and queue.kinds() == [(JobKind.SYNC_FOLDER.value, "INBOX")]
    queue.jobs.clear()
    rows.sync()    # the job ran
    reads = settled(poll, rows)
    poll.tick()
    assert rows.reads == reads and queue.jobs == []
    archive = sorted(m for m, t in harness.messages().items() if t.folder_id == "Archive")
    harness.set_flagged(archive[0], True)     # one of them changes whatever they were
    harness.set_flagged(archive[1], False)
    poll.tick()
    assert rows.reads == reads + 1 and queue.kinds() == [(JobKind.SYNC_FOLDER.value, "Archive")]


def test_each_kind_of_change_enqueues_exactly_its_folder(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    rows = Synced(harness)
    queue = ListQueue()
    poll = poller(harness, rows, queue)
    archive = sorted(m for m, t in harness.messages().items() if t.folder_id == "Archive")
    harness.set_flagged(archive[0], True)
    harness.set_flagged(archive[1], False)
    poll.tick()
    assert queue.kinds() == [(JobKind.SYNC_FOLDER.value, "Archive")]
    rows.sync()
    queue.jobs.clear()
    harness.deliver("new")
    harness.delete(archive[2], permanently=True)
    poll.tick()
    assert queue.kinds() == [(JobKind.SYNC_FOLDER.value, "Archive"), (JobKind.SYNC_FOLDER.value, "INBOX")]
    rows.sync()
    queue.jobs.clear()
    harness.create_folder("Brand new")
    dovecot.set_uidvalidity(harness.user, "Projects", 99)
    poll.tick()
    assert queue.kinds() == [(JobKind.SYNC_FOLDER.value, "Projects"), (JobKind.SYNC_FOLDERS.value, None)]
    assert all(j.account_id == harness.account_id and j.reason == "imap_poll" for j in queue.jobs)


def test_a_refused_login_goes_to_the_engine_and_an_outage_is_counted(dovecot_refusals: DovecotServer) -> None:
    harness = make_harness(dovecot_refusals)
    rows = Synced(harness)
    queue = ListQueue()
    wrong = ImapEndpoint(harness.user.host, harness.user.port, "none", harness.user.username)
    refused = poller(harness, rows, queue,
                     lambda _id: ImapSession.connect(wrong, lambda _f: "wrong", allow_insecure=True,
                                                     policy=loopback_policy())).tick()
    assert refused.errors == 1 and queue.kinds() == [(JobKind.SYNC_FOLDERS.value, None)]
    queue.jobs.clear()

    def down(_id: str) -> ImapSession:
        raise ProviderUnavailable("connection refused")

    report = poller(harness, rows, queue, down).tick()
    assert report.errors == 1 and queue.jobs == []


def test_scan_mode_folders_notice_new_mail_and_expunges(dovecot_plain: DovecotServer) -> None:
    harness = make_harness(dovecot_plain)
    rows = Synced(harness)
    queue = ListQueue()
    poll = poller(harness, rows, queue)
    poll.tick()
    assert queue.jobs == []
    harness.deliver("new")
    poll.tick()
    assert queue.kinds() == [(JobKind.SYNC_FOLDER.value, "INBOX")]


# --- the listener --------------------------------------------------------------------------------

def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("not within the timeout")


@pytest.fixture(params=["notify", "idle"])
def listening(request: pytest.FixtureRequest, dovecot: DovecotServer, dovecot_plain: DovecotServer
              ) -> Iterator[tuple[ImapHarness, ListQueue, ImapListener]]:
    server = dovecot if request.param == "notify" else dovecot_plain
    harness = make_harness(server)
    with harness.client() as client:
        for folder in harness.folders():
            client.select_folder(folder)   # Dovecot's first read-write SELECT clears \Recent: an event of its own
    queue = ListQueue()
    listener = ImapListener(lambda: [harness.account_id], lambda _id: harness.connect(), queue, refresh_s=3600)
    import threading

    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    _wait_for(lambda: harness.account_id in listener.watchers)
    watcher = listener.watchers[harness.account_id]
    _wait_for(watcher.ready.is_set)
    assert watcher.mode == request.param
    if request.param == "idle":
        time.sleep(0.5)   # the per-folder IDLE connections come up after the folder list
    yield harness, queue, listener
    listener.stop()
    thread.join(timeout=10)


def test_the_listener_turns_changes_in_any_folder_into_jobs(
        listening: tuple[ImapHarness, ListQueue, ImapListener]) -> None:
    harness, queue, _listener = listening
    archive = sorted(m for m, t in harness.messages().items() if t.folder_id == "Archive")
    harness.set_flagged(archive[0], not harness.messages()[archive[0]].flagged)
    _wait_for(lambda: (JobKind.SYNC_FOLDER.value, "Archive") in queue.kinds())
    with harness.client() as client:
        client.append("Projects/2026", rfc822("deep new mail"))
    _wait_for(lambda: (JobKind.SYNC_FOLDER.value, "Projects/2026") in queue.kinds())
    harness.deliver("inbox news")
    _wait_for(lambda: (JobKind.SYNC_FOLDER.value, "INBOX") in queue.kinds())
    assert all(j.account_id == harness.account_id and j.reason == "imap_listener" for j in queue.jobs)


def test_the_listener_sees_folder_list_changes(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    queue = ListQueue()
    listener = ImapListener(lambda: [harness.account_id], lambda _id: harness.connect(), queue, refresh_s=3600)
    import threading

    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: harness.account_id in listener.watchers
                  and listener.watchers[harness.account_id].ready.is_set())
        harness.create_folder(f"Made {uuid.uuid4().hex[:6]}")
        _wait_for(lambda: (JobKind.SYNC_FOLDERS.value, None) in [(j.kind, j.folder_id) for j in queue.jobs])
    finally:
        listener.stop()
        thread.join(timeout=10)


def test_the_graph_subscription_renewer_leaves_imap_accounts_alone(storage_settings: Settings) -> None:
    # Ensuring a Graph subscription for an IMAP account would ask MSAL for a token cache it never had,
    # and the token provider would mark the account reauth_required: the renewer must skip it.
    from mailsync.monitoring.subscriptions import SubscriptionManager
    from mailsync.storage.connection import table_client
    from mailsync.storage.subscriptions import TableSubscriptionStore
    from mailsync.storage.table_errors import ensure_table

    settings = replace(storage_settings, graph_sandbox_url="http://127.0.0.1:9")   # webhooks "enabled"
    table = table_client(settings, "subscriptions")
    ensure_table(table)
    now = datetime.now(UTC)
    imap = Account(account_id=uuid.uuid4().hex, provider=Provider.IMAP, status=AccountStatus.SYNCED,
                   access_token_hash="x", created_at=now, updated_at=now)
    outlook = replace(imap, account_id=uuid.uuid4().hex, provider=Provider.OUTLOOK)

    class Directory(Accounts):
        def get(self, account_id: str) -> Account | None:
            return next((a for a in self.items if a.account_id == account_id), None)

    queue = ListQueue()
    manager = SubscriptionManager(settings, TableSubscriptionStore(table), object(),  # type: ignore[arg-type]
                                  Directory([imap, outlook]), queue)
    assert manager.enabled
    report = manager.renewal_pass()
    assert report.create == 1
    assert [(j.kind, j.account_id) for j in queue.jobs] == [(JobKind.SUBSCRIPTION.value, outlook.account_id)]
