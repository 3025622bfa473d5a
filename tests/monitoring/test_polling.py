"""The poll scheduler against Azurite: who is polled, how often, and with what delay."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from mailsync.actions.models import READ, ActionClaim
from mailsync.errors import StoreUnavailable
from mailsync.jobs import JobKind
from mailsync.models import AccountStatus, Job
from mailsync.monitoring.polling import PollScheduler
from mailsync.monitoring.records import AccountMonitor
from mailsync.monitoring.store_watch import StoreWatch
from mailsync.storage.connection import table_client
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.store_generation import TableGenerationLedger
from mailsync.storage.table_errors import ensure_table
from mailsync.store.action_ledger import SearchActionLedger
from mailsync.store.search_store import SearchStore
from tests.monitoring.harness import Harness, make_harness

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def accounts(h: Harness) -> dict[str, str]:
    """One account in each monitoring situation: name -> account id."""
    made = {name: h.add_account() for name in ("healthy", "failing", "expired", "never")}
    made["reauth"] = h.add_account(AccountStatus.REAUTH_REQUIRED)
    made["linking"] = h.add_account(AccountStatus.LINKING)
    later = NOW + timedelta(days=1)
    h.subscriptions.save_monitor(AccountMonitor(made["healthy"], "s1", later))
    h.subscriptions.save_monitor(AccountMonitor(made["failing"], "s2", later, failures=2, last_error="provider_error"))
    h.subscriptions.save_monitor(AccountMonitor(made["expired"], "s3", NOW - timedelta(minutes=1)))
    return made


def polled(env: dict[str, str], **settings: str) -> dict[str, str]:
    """Run one tick; return account id -> reason of every job it enqueued (waiting out their delays)."""
    harness = make_harness(env, **settings)
    scheduler = PollScheduler(harness.settings, harness.accounts, harness.subscriptions, harness.queue,
                              clock=lambda: NOW)
    report = scheduler.tick()
    count = harness.queued_count()
    assert count == report.polled + report.swept
    jobs = harness.drain()
    while len(jobs) < count:                 # delayed by up to 2.5 ticks (5 s here)
        jobs += harness.drain(wait_s=0.5)
    assert {job.kind for job in jobs} <= {JobKind.SYNC_ACCOUNT.value}
    return {job.account_id: job.reason for job in jobs}


def test_accounts_without_a_healthy_subscription_are_polled_and_the_rest_swept(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env)
    made = accounts(h)
    # Interval == tick: every due account is enqueued on every tick (short delays keep the test quick).
    got = polled(storage_env, POLL_INTERVAL_S="2", POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="2")
    by_name = {name: got.get(account) for name, account in made.items()}
    assert by_name == {"healthy": "sweep", "failing": "poll", "expired": "poll", "never": "poll",
                       "reauth": None, "linking": None}


def test_safety_sweeps_can_be_turned_off(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env)
    made = accounts(h)
    got = polled(storage_env, POLL_INTERVAL_S="2", POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="0")
    assert made["healthy"] not in got and made["never"] in got


def test_without_a_reachable_webhook_every_account_is_polled(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env)
    made = accounts(h)
    # Real Microsoft Graph, PUBLIC_BASE_URL unset (127.0.0.1): Graph could never call us.
    got = polled(storage_env, MS_CLIENT_ID="app", MS_CLIENT_SECRET="secret", POLL_INTERVAL_S="2",
                 POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="0")
    assert {a for name, a in made.items() if name not in ("reauth", "linking")} == set(got)
    assert set(got.values()) == {"poll"}


class RecordingQueue:
    """The real queue, noting each job's visibility delay (the spreading is in the delays)."""

    def __init__(self, inner: AzureJobQueue) -> None:
        self.inner = inner
        self.sent: list[tuple[Job, float]] = []

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        self.inner.enqueue(job, delay_s=delay_s)
        self.sent.append((job, delay_s))

    def take(self) -> list[tuple[Job, float]]:
        sent, self.sent = self.sent, []
        return sent


def test_a_recreated_store_is_noticed_by_the_next_tick_and_every_account_resynced_spread_out(
        storage_env: dict[str, str], store: SearchStore) -> None:
    h = make_harness(storage_env, STORE_RESYNC_PER_S="2", POLL_INTERVAL_S="3600", POLL_INTERVAL_SUBSCRIBED_S="0")
    watched = {h.add_account() for _ in range(3)} | {h.add_account(AccountStatus.SYNCING)}
    h.add_account(AccountStatus.REAUTH_REQUIRED)   # cannot sync: linking it again syncs it
    table = table_client(h.settings, "sync")
    ensure_table(table)
    ledger = TableGenerationLedger(table)
    queue = RecordingQueue(h.queue)
    watch = StoreWatch(lambda: store, ledger, h.accounts, queue, per_s=h.settings.store_resync_per_s)
    scheduler = PollScheduler(h.settings, h.accounts, h.subscriptions, queue, store_watch=watch, clock=lambda: NOW)

    # The first tick ever records the generation and gives every watched account one sync.
    assert scheduler.tick().resynced == len(watched)
    assert ledger.seen() == store.generation()
    queue.take()
    assert scheduler.tick().resynced == 0, "the same store: nothing to do"

    store.engine.delete_indices([store.names.messages_index, store.names.mailboxes_index])
    report = scheduler.tick()   # no mail changed, no job ran: the tick alone notices
    assert report.resynced == len(watched)
    resyncs = [(job, delay) for job, delay in queue.take() if job.reason == "store_generation"]
    assert {job.account_id for job, _ in resyncs} == watched
    assert {job.kind for job, _ in resyncs} == {JobKind.SYNC_FOLDERS.value}
    assert sorted(delay for _, delay in resyncs) == [0.0, 0.5, 1.0, 1.5], "2 per second, the first at once"
    jobs = h.drain(wait_s=2)
    assert watched <= {job.account_id for job in jobs if job.reason == "store_generation"}, "all on the queue"
    assert scheduler.tick().resynced == 0, "recorded: the next tick does not enqueue them again"


def test_the_tick_undoes_the_relaxed_refresh_a_dead_initial_load_left(
        storage_env: dict[str, str], make_store: Callable[..., SearchStore]) -> None:
    h = make_harness(storage_env, POLL_INTERVAL_S="3600", POLL_INTERVAL_SUBSCRIBED_S="0")
    now = [datetime.now(UTC)]
    store = make_store(bulk_lease_s=60.0, clock=lambda: now[0])
    table = table_client(h.settings, "sync")
    ensure_table(table)
    watch = StoreWatch(lambda: store, TableGenerationLedger(table), h.accounts, h.queue, per_s=10)
    scheduler = PollScheduler(h.settings, h.accounts, h.subscriptions, h.queue, store_watch=watch, clock=lambda: NOW)

    def interval() -> Any:
        found = store.engine.get_settings(store.names.messages)
        return next(iter(found.values()))["settings"]["index"].get("refresh_interval")

    store.begin_bulk_load("acct1", "INBOX")   # the worker loading INBOX is killed: nobody ends its load
    scheduler.tick()
    assert interval() == "30s", "its lease is live: the load may still be running"
    now[0] += timedelta(seconds=61)
    scheduler.tick()
    assert interval() is None, "expired: the next tick restored the normal refresh"


class _DownStore:
    def generation(self) -> str:
        raise StoreUnavailable("connection refused")

    def expire_bulk_loads(self) -> bool:
        raise StoreUnavailable("connection refused")


def test_polling_goes_on_while_the_store_is_down(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env, POLL_INTERVAL_S="2", POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="0")
    account = h.add_account()
    down: Any = _DownStore()
    watch = StoreWatch(lambda: down, TableGenerationLedger(table_client(h.settings, "sync")), h.accounts, h.queue,
                       per_s=10)
    report = PollScheduler(h.settings, h.accounts, h.subscriptions, h.queue, store_watch=watch,
                           clock=lambda: NOW).tick()
    assert (report.polled, report.resynced) == (1, 0)
    jobs = h.drain()
    while not jobs:
        jobs = h.drain(wait_s=0.5)
    assert [(job.account_id, job.kind) for job in jobs] == [(account, JobKind.SYNC_ACCOUNT.value)]


def test_the_tick_purges_the_action_ledger_at_most_hourly_and_goes_on_when_it_cannot(
        storage_env: dict[str, str], store: SearchStore) -> None:
    h = make_harness(storage_env, POLL_INTERVAL_S="3600", POLL_INTERVAL_SUBSCRIBED_S="0")
    table = table_client(h.settings, "sync")
    ensure_table(table)
    long_ago = time.time() - 10 * 24 * 3600
    old = SearchActionLedger(store.engine, store.names, clock=lambda: long_ago)
    old.claim("acct", [ActionClaim("m", {READ: True})])
    ledger = SearchActionLedger.of(store)
    now = [0.0]
    purges: list[int] = []

    def purge() -> int:
        purges.append(ledger.purge())
        if len(purges) == 2:
            raise StoreUnavailable("connection refused")
        return purges[-1]

    watch = StoreWatch(lambda: store, TableGenerationLedger(table), h.accounts, h.queue, per_s=10, purge=purge,
                       clock=lambda: now[0])
    scheduler = PollScheduler(h.settings, h.accounts, h.subscriptions, h.queue, store_watch=watch, clock=lambda: NOW)
    scheduler.tick()
    assert purges == [1] and ledger.latest("acct", ["m"]) == {}      # the week-old entry is gone
    now[0] = 1800.0
    scheduler.tick()
    assert purges == [1], "not again within the hour"
    now[0] = 3600.0
    report = scheduler.tick()                                        # the purge fails: the tick goes on
    assert len(purges) == 2 and report.resynced == 0
