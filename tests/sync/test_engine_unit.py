"""Unit tests of the engine's pure parts: policy (what next, how long to wait), Retry-After,
back-off limits, the read-ahead pipeline, the SignalR event buffer, the status summary, job
dispatch, and the sync_worker function's handling of poison messages.

The lease/dirty state machine itself is tested against Azurite in
tests/storage/test_folder_leases.py; whole scenarios in tests/sync/test_engine.py.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from mailsync.errors import (
    CursorExpired,
    DependencyUnavailable,
    MalformedResponse,
    PoisonJob,
    ProviderError,
    ProviderThrottled,
    ProviderUnavailable,
    StoreUnavailable,
)
from mailsync.jobs import JobKind, JobOutbox, WakingJobQueue, decode_job, encode_job, new_job
from mailsync.models import Address, Job, Message, MessageBatch, MessagesChanged, Provider, SyncPhase, SyncProgress
from mailsync.providers.graph_client import MAX_RETRY_AFTER_S, backoff_delay, parse_retry_after
from mailsync.realtime.signalr_messages import MAX_UPSERTS, BufferingPublisher
from mailsync.storage.sync_rows import AccountSyncState, SyncState
from mailsync.sync import policy
from mailsync.sync.invocation import REAUTH_MESSAGES, Delivery
from mailsync.sync.pipeline import PageReader
from mailsync.sync.status import account_phase
from mailsync.sync.worker import Invocation, SyncWorker

NOW = 1_800_000_000.0
GEN = "gen-1"


def row(folder_id: str | None = "f", **fields: Any) -> SyncState:
    base: dict[str, Any] = {"account_id": "a", "folder_id": folder_id, "cursor": "c", "phase": SyncPhase.INCREMENTAL,
                            "rounds": 1, "generation": GEN}
    base.update(fields)
    return SyncState(**base)


# --- Retry-After and back-off ------------------------------------------------------------------

def test_every_provider_has_its_own_reauth_message() -> None:
    assert set(REAUTH_MESSAGES) == set(Provider)
    assert len(set(REAUTH_MESSAGES.values())) == len(Provider)


def test_retry_after_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after(" 2.5 ", now=now) == 2.5
    assert parse_retry_after("Tue, 24 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Tue, 24 Nov 2026 11:59:00 GMT", now=now) == 0.0, "a date in the past: now"
    assert parse_retry_after("-5", now=now) == 0.0
    assert parse_retry_after("99999999", now=now) == MAX_RETRY_AFTER_S, "capped: a bad header cannot park forever"
    for junk in (None, "", "soon", "nan", "Tue, 99 Nov"):
        assert parse_retry_after(junk, now=now) is None


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        ceiling = min(60.0, 1.0 * 2 ** attempt)
        samples = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8, "full jitter reaches up to the ceiling"
    assert backoff_delay(10_000, rng=rng) <= 60.0
    assert backoff_delay(-3, rng=rng) <= 1.0


def test_wait_honours_retry_after_and_sleeps_only_short_waits() -> None:
    throttled = ProviderThrottled("429", retry_after_s=1.5)
    wait = policy.wait_for(throttled, attempt=0, failures=0, time_left_s=60)
    assert wait.seconds == 1.5 and wait.in_place and wait.mailbox_wide
    long = policy.wait_for(ProviderThrottled("429", retry_after_s=30), attempt=0, failures=0, time_left_s=60)
    assert long.seconds == 30 and not long.in_place, "a long wait goes back to the queue"
    near_end = policy.wait_for(throttled, attempt=0, failures=0, time_left_s=1.0)
    assert not near_end.in_place, "no sleeping past the invocation's budget"
    tired = policy.wait_for(throttled, attempt=policy.MAX_QUICK_RETRIES, failures=0, time_left_s=60)
    assert not tired.in_place, "a few quick retries, then the queue"
    unavailable = policy.wait_for(ProviderUnavailable("503", retry_after_s=4), attempt=0, failures=0,
                                  time_left_s=60)
    assert unavailable.seconds == 4 and not unavailable.mailbox_wide


def test_wait_without_retry_after_backs_off_over_consecutive_failures() -> None:
    rng = random.Random(3)
    error = ProviderUnavailable("504")
    early = [policy.wait_for(error, attempt=0, failures=0, time_left_s=99, rng=rng).seconds for _ in range(100)]
    late = [policy.wait_for(error, attempt=0, failures=8, time_left_s=99, rng=rng, cap_s=120).seconds
            for _ in range(100)]
    assert max(early) <= 1.0 and max(late) <= 120 and sum(late) > sum(early) * 10


def test_which_faults_are_waited_out() -> None:
    for error in (ProviderThrottled("x", retry_after_s=1), ProviderUnavailable("x"), MalformedResponse("x"),
                  DependencyUnavailable("x"), StoreUnavailable("x")):
        assert policy.retryable(error)
    for error in (CursorExpired("x"), ProviderError("400"), PoisonJob("x")):
        assert not policy.retryable(error)
    assert policy.is_permanent_provider_error(ProviderError("400"))


# --- what to work on next --------------------------------------------------------------------------

def test_full_round_when_never_started_asked_or_store_recreated() -> None:
    assert not policy.needs_full_round(row(), GEN)
    assert policy.needs_full_round(row(cursor=None), GEN)
    assert policy.needs_full_round(row(cursor=""), GEN)
    assert policy.needs_full_round(row(resync_requested=True), GEN)
    assert policy.needs_full_round(row(), "gen-2")


def test_epochs_only_grow_even_when_a_row_is_recreated() -> None:
    assert policy.next_epoch(5, NOW) == int(NOW) - policy.EPOCH_BASE_S
    big = policy.next_epoch(0, NOW)
    assert policy.next_epoch(big, NOW) == big + 1
    assert policy.next_epoch(0, NOW + 10) > big, "a new row starts above anything written before"
    assert big < 2**31, "fits a table int32"


def test_pending_rows_and_their_order() -> None:
    rows = [
        row("big", rounds=0, phase=SyncPhase.INITIAL, expected=900, cursor=None),
        row("small", rounds=0, phase=SyncPhase.INITIAL, expected=10, cursor=None),
        row("inbox", rounds=0, phase=SyncPhase.INITIAL, role="inbox", expected=5, cursor=None),
        row("followed", dirty=True),
        row("quiet"),
        row(None, dirty=True),
        row("leased", dirty=True, lease_owner="x#1", lease_until=NOW + 60),
        row("expired", dirty=True, lease_owner="x#1", lease_until=NOW - 1),
        row("waiting", dirty=True, not_before=NOW + 30),
        row("parked", failures=policy.MAX_FAILURES, rounds=0, phase=SyncPhase.INITIAL),
        row("parked-but-dirty", failures=policy.MAX_FAILURES, dirty=True, rounds=0, phase=SyncPhase.INITIAL),
        row("restored", generation="old"),
    ]
    order = [r.folder_id for r in policy.pending_order(rows, GEN, NOW)]
    assert order[0] is None, "the folder list first"
    assert set(order[1:4]) == {"followed", "expired", "restored"}, "then followed folders with changes"
    assert order[4] == "parked-but-dirty" or order[4] == "inbox"
    assert order.index("inbox") < order.index("big") < order.index("small"), "Inbox, then largest first"
    assert not {"quiet", "leased", "waiting", "parked"} & set(order)


def test_next_wake_is_the_most_urgent_pending_row_after_the_mailbox_hold() -> None:
    rows = [row(None), row("small", rounds=0, phase=SyncPhase.INITIAL, expected=10, cursor=None),
            row("followed", dirty=True), row("waiting", dirty=True, not_before=NOW + 30)]
    assert policy.next_wake(rows, GEN, NOW) == (rows[2], 0.0)
    held = [row(None, not_before=NOW + 12), *rows[1:]]
    assert policy.next_wake(held, GEN, NOW) == (rows[2], 12.0), "nothing starts before a 429's hold ends"


def test_next_wake_comes_back_for_the_first_backing_off_row_when_nothing_is_pending() -> None:
    # A backing-off folder's own delayed job may have been consumed by an
    # invocation that could not start it: whoever ends last comes back for it.
    waiting = [row("later", rounds=0, phase=SyncPhase.INITIAL, cursor=None, not_before=NOW + 40),
               row("sooner", dirty=True, not_before=NOW + 7)]
    others = [row(None), row("quiet", not_before=NOW + 5),
              row("leased", dirty=True, lease_owner="x#1", lease_until=NOW + 60, not_before=NOW + 1),
              row("parked", failures=policy.MAX_FAILURES, rounds=0, phase=SyncPhase.INITIAL, not_before=NOW + 2)]
    assert policy.next_wake([*others, *waiting], GEN, NOW) == (waiting[1], 7.0)
    held = [row(None, not_before=NOW + 9), *others[1:], *waiting]
    assert policy.next_wake(held, GEN, NOW) == (waiting[1], 9.0)
    assert policy.next_wake(others, GEN, NOW) is None, "quiet, leased and parked rows need no continuation"


# --- the read-ahead ------------------------------------------------------------------------------

def _pages(n: int, per: int = 3) -> dict[str | None, MessageBatch]:
    pages: dict[str | None, MessageBatch] = {}
    cursor: str | None = None
    for i in range(n):
        ups = tuple(Message("a", f"m{i}-{j}", "f", 1) for j in range(per))
        pages[cursor] = MessageBatch(ups, (), f"c{i}", complete=i == n - 1)
        cursor = f"c{i}"
    return pages


def test_reader_returns_pages_in_order_and_groups_ready_ones() -> None:
    pages = _pages(6)
    with PageReader(lambda c: pages[c], None, depth=4) as reader:
        time.sleep(0.2)   # let it read ahead
        first = reader.take(max_messages=7)
        assert [p.cursor for p in first] == ["c0", "c1", "c2"], "grouped up to the message cap"
        rest: list[MessageBatch] = []
        while not rest or not rest[-1].complete:
            rest.extend(reader.take(max_messages=100))
        assert [p.cursor for p in rest] == ["c3", "c4", "c5"]


def test_reader_reads_at_most_depth_pages_ahead() -> None:
    pages = _pages(20)
    fetched: list[str | None] = []

    def fetch(cursor: str | None) -> MessageBatch:
        fetched.append(cursor)
        return pages[cursor]

    with PageReader(fetch, None, depth=2) as reader:
        time.sleep(0.3)
        assert len(fetched) <= 3, "two queued plus one in hand"
        reader.take(1)
        time.sleep(0.2)
        assert len(fetched) <= 4


def test_reader_raises_errors_after_the_pages_before_them() -> None:
    pages = _pages(5)

    def fetch(cursor: str | None) -> MessageBatch:
        if cursor == "c1":
            raise ProviderUnavailable("503")
        return pages[cursor]

    with PageReader(fetch, None, depth=4) as reader:
        time.sleep(0.2)
        assert [p.cursor for p in reader.take(100)] == ["c0", "c1"]
        with pytest.raises(ProviderUnavailable):
            reader.take(100)


def test_reader_stops_at_the_deadline() -> None:
    pages = _pages(50)
    clock = {"now": 0.0}
    with PageReader(lambda c: pages[c], None, depth=4, deadline=10.0, clock=lambda: clock["now"]) as reader:
        assert reader.take(3)
        clock["now"] = 11.0
        seen = 0
        while True:
            got = reader.take(3)
            if not got:
                break
            seen += len(got)
        assert seen <= 5, "nothing is read for an invocation that is over"


def test_close_waits_for_the_request_in_flight() -> None:
    started, release = threading.Event(), threading.Event()
    pages = _pages(3)

    def fetch(cursor: str | None) -> MessageBatch:
        if cursor == "c0":
            started.set()
            release.wait(5)
        return pages[cursor]

    reader = PageReader(fetch, None, depth=4)
    reader.take(100)
    assert started.wait(5)
    closer = threading.Thread(target=reader.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "a request is in flight: its slot is still in use"
    release.set()
    closer.join(5)
    assert not closer.is_alive()


def test_reader_never_reads_more_than_the_window_beyond_the_saved_page() -> None:
    # Outlook keeps 3 links per folder: with a window of 2, the saved one is always among them.
    pages = _pages(12)
    fetched: list[str | None] = []

    def fetch(cursor: str | None) -> MessageBatch:
        fetched.append(cursor)
        return pages[cursor]

    with PageReader(fetch, None, depth=4, window=2) as reader:
        time.sleep(0.3)
        assert len(fetched) == 2, "two links issued beyond the saved one, then it waits"
        taken = reader.take(1)
        time.sleep(0.2)
        assert len(fetched) == 2, "taken is not saved: still waiting"
        reader.saved(len(taken))
        time.sleep(0.3)
        assert len(fetched) == 3
        saved = len(taken)
        while True:
            got = reader.take(100)
            reader.saved(len(got))
            saved += len(got)
            assert len(fetched) - saved <= 2
            if got[-1].complete:
                break
    assert saved == 12


def test_a_reader_whose_window_is_full_of_pages_being_written_says_it_waits_for_a_save() -> None:
    # Both pages of the window taken (their writes in flight): take() would wait forever, the engine saves first.
    pages = _pages(6)
    with PageReader(lambda c: pages[c], None, depth=4, window=2) as reader:
        time.sleep(0.2)
        assert not reader.waits_for_a_save(), "two pages are read and waiting to be taken"
        taken = reader.take(1)
        assert not reader.waits_for_a_save()
        taken += reader.take(1)
        assert reader.waits_for_a_save()
        reader.saved(1)
        time.sleep(0.2)
        assert not reader.waits_for_a_save(), "one more page was read"
    with PageReader(lambda c: pages[c], None, depth=4) as unbounded:
        time.sleep(0.2)
        for _ in range(4):
            unbounded.take(1)
        assert not unbounded.waits_for_a_save(), "without a window the reader never waits for a save"


def test_drain_hands_over_every_page_read_and_reads_no_more() -> None:
    started, release = threading.Event(), threading.Event()
    pages = _pages(10)
    fetched: list[str | None] = []

    def fetch(cursor: str | None) -> MessageBatch:
        fetched.append(cursor)
        if cursor == "c2":
            started.set()
            release.wait(5)
        return pages[cursor]

    reader = PageReader(fetch, None, depth=2)
    assert [p.cursor for p in reader.take(1)] == ["c0"]
    assert started.wait(5)                      # c1 and c2 queued, c3 in flight
    threading.Timer(0.2, release.set).start()
    drained = reader.drain()
    assert [p.cursor for p in drained] == ["c1", "c2", "c3"], "the request in flight is waited for and kept"
    reader.close()
    assert fetched == [None, "c0", "c1", "c2"], "nothing is read after the drain"


def test_drain_after_the_last_page_is_empty() -> None:
    pages = _pages(2)
    with PageReader(lambda c: pages[c], None, depth=4) as reader:
        got: list[MessageBatch] = []
        while not got or not got[-1].complete:
            got.extend(reader.take(100))
        assert reader.drain() == []


# --- SignalR messages --------------------------------------------------------------------------

def _msg(i: int, folder: str = "inbox", **fields: Any) -> Message:
    base: dict[str, Any] = {"account_id": "acc", "message_id": f"m{i}", "folder_id": folder, "version": i,
                            "subject": f"s{i}", "sender": Address("a@x", "A"),
                            "received_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i)}
    base.update(fields)
    return Message(**base)


def test_events_coalesce_per_invocation_and_target_the_account() -> None:
    events = BufferingPublisher()
    assert not events
    for n in range(5):
        events.publish_progress(SyncProgress("acc", "initial", "f1", 0, 3, n * 10, 1.0))
    events.publish_progress(SyncProgress("acc", "initial", "f2", 0, 3, 60, 1.0))
    events.publish_changes(MessagesChanged("acc", upserted=(_msg(1), _msg(2))))
    events.publish_changes(MessagesChanged("acc", upserted=(_msg(1, subject="new"),), removed=(("inbox", "m2"),)))
    messages = orjson.loads(events.messages_json())
    assert [m["target"] for m in messages] == ["messagesChanged", "syncProgress", "syncProgress"]
    assert {m["userId"] for m in messages} == {"acc"}
    changes = messages[0]["arguments"][0]
    assert [u["subject"] for u in changes["upserted"]] == ["new"]
    assert changes["removed"] == [{"folder_id": "inbox", "message_id": "m2"}]
    assert changes["upserted"][0]["sender"] == {"name": "A", "address": "a@x"}
    progress = [m["arguments"][0] for m in messages[1:]]
    assert [(p["folder_id"], p["messages_indexed"]) for p in progress] == [("f1", 40), ("f2", 60)]


def test_a_move_within_an_invocation_is_a_removal_and_an_upsert() -> None:
    events = BufferingPublisher()
    events.publish_changes(MessagesChanged("acc", upserted=(_msg(1, "archive"),)))
    events.publish_changes(MessagesChanged("acc", removed=(("inbox", "m1"),)))
    changes = events.messages()[0]["arguments"][0]
    assert changes["removed"] == [{"folder_id": "inbox", "message_id": "m1"}]
    assert [u["folder_id"] for u in changes["upserted"]] == ["archive"]


def test_big_pages_are_truncated_to_the_newest() -> None:
    events = BufferingPublisher()
    events.publish_changes(MessagesChanged("acc", upserted=tuple(_msg(i) for i in range(500))))
    changes = events.messages()[0]["arguments"][0]
    assert changes["truncated"] and changes["upserted_total"] == 500
    assert len(changes["upserted"]) == MAX_UPSERTS
    assert changes["upserted"][0]["message_id"] == "m499"


# --- status ---------------------------------------------------------------------------------------

def test_account_phase() -> None:
    def state(folder_list: SyncState | None, *folders: SyncState) -> AccountSyncState:
        return AccountSyncState("a", folder_list, {f.folder_id or "": f for f in folders}, 0)

    assert account_phase(state(None)) == "pending"
    assert account_phase(state(row(None, rounds=0))) == "folders"
    assert account_phase(state(row(None), row("x", rounds=0))) == "initial"
    assert account_phase(state(row(None), row("x", phase=SyncPhase.RESYNC))) == "resync"
    assert account_phase(state(row(None), row("x"))) == "synced"


# --- dispatch and the function -------------------------------------------------------------------

class _Engine:
    """Records the jobs it runs; a job with ``attrs["then"]`` enqueues that kind for the same account, to run
    now, through the queue the engine gives its invocations (the SDK's, waking through ``wake``)."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.sent: list[Job] = []

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        self.sent.append(job)

    def handle(self, job: Any, delivery: Delivery, events: Any, *, wake: JobOutbox | None = None) -> None:
        self.jobs.append(job.kind)
        if "then" in job.attrs:
            queue = self if wake is None else WakingJobQueue(self, wake)
            queue.enqueue(new_job(JobKind(job.attrs["then"]), job.account_id, "f"))


def test_dispatch_routes_engine_kinds_and_registered_ones() -> None:
    engine = _Engine()
    worker = SyncWorker(engine)  # type: ignore[arg-type]
    invocation = Invocation(Delivery("d"), BufferingPublisher())
    for kind in (JobKind.SYNC_FOLDERS, JobKind.SYNC_FOLDER, JobKind.RESYNC_FOLDER, JobKind.RESYNC_ACCOUNT):
        worker.run(new_job(kind, "acc", "f"), invocation)
    assert engine.jobs == ["sync_folders", "sync_folder", "resync_folder", "resync_account"]
    with pytest.raises(PoisonJob):
        worker.run(new_job(JobKind.NOTIFIED, "acc"), invocation)
    seen: list[str] = []
    worker.register([JobKind.NOTIFIED], lambda job, inv: seen.append(job.kind))
    worker.run(new_job(JobKind.NOTIFIED, "acc"), invocation)
    assert seen == ["notified"] and worker.handles("notified")


class _Out:
    def __init__(self) -> None:
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def test_poison_messages_go_to_the_poison_queue_with_their_reason() -> None:
    from azure.functions.queue import QueueMessage

    from functions.sync_worker import sync_worker

    handler = sync_worker.build().get_user_function()
    for body in (b"not json", b'{"v": 1, "kind": "explode", "account_id": "a"}', b"[1]"):
        message = QueueMessage(id="q-1", body=body, dequeue_count=1)
        signalr, poison, wake = _Out(), _Out(), _Out()
        handler(message, signalr, poison, wake)
        assert poison.value is not None and signalr.value is None and wake.value is None
        record = orjson.loads(poison.value)
        assert record["body"] == body.decode() and record["reason"] and record["message_id"] == "q-1"


def test_good_messages_never_touch_the_poison_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.functions.queue import QueueMessage

    import functions.sync_worker as module

    engine = _Engine()

    class _Runtime:
        sync_worker = SyncWorker(engine)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "runtime", lambda: _Runtime())
    handler = module.sync_worker.build().get_user_function()
    body = encode_job(new_job(JobKind.SYNC_FOLDERS, "acc")).encode()
    signalr, poison, wake = _Out(), _Out(), _Out()
    handler(QueueMessage(id="q-2", body=body, dequeue_count=2), signalr, poison, wake)
    assert engine.jobs == ["sync_folders"] and poison.value is None
    assert wake.value is None, "a run that enqueued nothing writes no WAKE"


def test_a_job_enqueued_to_run_now_is_followed_by_a_wake_through_the_output_binding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's jobs go with the SDK inside the run; the function's ``wake`` output (its queue output
    binding on the sync queue, written as it returns) gets one WAKE, so the host polls at once."""
    from azure.functions.queue import QueueMessage

    import functions.sync_worker as module

    engine = _Engine()

    class _Runtime:
        sync_worker = SyncWorker(engine)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "runtime", lambda: _Runtime())
    handler = module.sync_worker.build().get_user_function()
    job = new_job(JobKind.SYNC_FOLDERS, "acc", attrs={"then": JobKind.SYNC_FOLDER.value})
    signalr, poison, wake = _Out(), _Out(), _Out()
    handler(QueueMessage(id="q-3", body=encode_job(job).encode(), dequeue_count=1), signalr, poison, wake)
    assert [j.kind for j in engine.sent] == ["sync_folder"], "the job itself went with the queue client"
    assert isinstance(wake.value, list) and len(wake.value) == 1
    woken = decode_job(wake.value[0])
    assert (woken.kind, woken.account_id) == ("wake", "acc") and poison.value is None


def test_a_removed_folder_takes_its_known_subfolders_along() -> None:
    from mailsync.sync.folder_list import _with_descendants

    tree = {"A": "root", "B": "A", "C": "B", "D": "root"}
    rows = AccountSyncState("a", None, {f: row(f, parent_id=p) for f, p in tree.items()}, 0)
    assert sorted(_with_descendants(["A"], rows)) == ["A", "B", "C"]
    assert _with_descendants(["gone"], rows) == ["gone"]
