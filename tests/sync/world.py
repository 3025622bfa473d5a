"""A whole sync deployment in one test process, with real services and knobs for faults.

Real: the Graph sandbox (mailbox, delta, throttling, faults), Azurite (the
sync table, the job queue, accounts), the search node (the store), the engine. The
Functions host is replaced by :class:`QueuePump`, a few threads that do
what the queue trigger does (receive, run, delete on success, let the
message reappear after its visibility timeout on failure) — so a test can
also make a worker die mid-page, duplicate jobs, and wait for the queue to
drain. ``tests/sync/test_end_to_end.py`` runs the same engine through the
real devhost instead.

Comparison: :func:`store_view` and :func:`sandbox_view` reduce both sides to
the same plain records; :func:`diff` says what is missing, extra or stale.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import ResourceExistsError

from graph_sandbox.state import SandboxUser
from mailsync.jobs import JobKind, decode_job, encode_job, new_job
from mailsync.linking.access import issue_access_token
from mailsync.models import Account, AccountStatus, Job, MessageQuery, MessagesChanged, Provider, SyncProgress
from mailsync.providers.graph import GraphProviderFactory
from mailsync.settings import Settings
from mailsync.storage.connection import queue_client
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.sync_table import SyncStateTable
from mailsync.store.search_store import SearchStore
from mailsync.sync.engine import Delivery, Outcome, SyncEngine
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.linking.tables import LinkingTables, linking_tables
from tests.sync.support import sync_table

log = logging.getLogger("tests.sync.world")
# The storage SDK logs every request at INFO: far too much next to the engine's logs.
logging.getLogger("azure").setLevel(logging.WARNING)


class SandboxTokens:
    """``TokenProvider`` with real sandbox tokens (signed in once through the sign-in form)."""

    def __init__(self, server: SandboxTestServer, address: str) -> None:
        self._server = server
        self._address = address
        self.refreshes = 0

    def access_token(self, account_id: str, *, force_refresh: bool = False) -> str:
        if force_refresh:
            self.refreshes += 1
        return self._server.user_token(self._address)


class RecordingPublisher:
    """An ``EventPublisher`` that keeps everything (thread-safe)."""

    def __init__(self) -> None:
        self.progress: list[SyncProgress] = []
        self.changes: list[MessagesChanged] = []
        self.failures: list[dict[str, Any]] = []     # actionsFailed items: {message_id, code, message}
        self._lock = threading.Lock()

    def publish_progress(self, event: SyncProgress) -> None:
        with self._lock:
            self.progress.append(event)

    def publish_changes(self, event: MessagesChanged) -> None:
        with self._lock:
            self.changes.append(event)

    def publish_action_failures(self, account_id: str, failures: list[dict[str, Any]]) -> None:
        with self._lock:
            self.failures.extend(failures)


class FaultyQueue:
    """The job queue, sending some jobs twice (duplicated deliveries must be harmless)."""

    def __init__(self, inner: AzureJobQueue, rng: random.Random) -> None:
        self.inner = inner
        self.rng = rng
        self.duplicate_rate = 0.0
        self.sent = 0

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        self.inner.enqueue(job, delay_s=delay_s)
        self.sent += 1
        if self.duplicate_rate and self.rng.random() < self.duplicate_rate:
            self.inner.enqueue(job, delay_s=delay_s)
            self.sent += 1


class InjectedFault(Exception):
    """A worker raising mid-page (the engine cleans up, the queue redelivers)."""


class WorkerKilled(BaseException):
    """A worker dying mid-page: nothing after this runs, not even the engine's cleanup."""


class KillableState(SyncStateTable):
    """The sync table, except that a killed worker's thread can no longer give anything back."""

    dead = threading.local()

    def _gone(self) -> bool:
        return bool(getattr(self.dead, "value", False))

    def release(self, lease: Any, **changes: Any) -> None:
        if not self._gone():
            super().release(lease, **changes)

    def release_slot(self, slot: Any) -> None:
        if not self._gone():
            super().release_slot(slot)


def misbehaving_worker(seed: int, *, kill_rate: float, raise_rate: float) -> Callable[[str, int], None]:
    """An engine ``before_write`` hook: before a page is written, the worker dies or raises at these rates.

    Dying leaves the lease and slot held (``KillableState``) and the message
    undeleted; raising lets the engine clean up and the queue redeliver.
    """
    rng = random.Random(seed)

    def misbehave(folder_id: str, page: int) -> None:
        roll = rng.random()
        if roll < kill_rate:
            KillableState.dead.value = True
            raise WorkerKilled()
        if roll < kill_rate + raise_rate:
            raise InjectedFault("worker raised mid-page")

    return misbehave


class _VisibilityKeeper:
    """Keeps a running message invisible, as the Functions host does for long invocations."""

    def __init__(self, client: Any, message: Any, visibility_s: int) -> None:
        self._client = client
        self._id = message.id
        self.pop_receipt = message.pop_receipt
        self._visibility_s = visibility_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._visibility_s / 2):
            try:
                updated = self._client.update_message(self._id, self.pop_receipt,
                                                      visibility_timeout=self._visibility_s)
                self.pop_receipt = updated.pop_receipt
            except Exception:
                return

    def stop(self) -> None:
        """Stop renewing (a killed worker stops too: the message then reappears)."""
        self._stop.set()
        self._thread.join()


@dataclass
class PumpStats:
    runs: int = 0
    failures: int = 0
    kills: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class QueuePump:
    """What the Functions host does with the sync queue, in a few threads."""

    def __init__(self, world: SyncWorld, *, workers: int = 4, visibility_s: int = 2,
                 max_dequeue_count: int = 5) -> None:
        self.world = world
        self.workers = workers
        self.visibility_s = visibility_s
        self.max_dequeue_count = max_dequeue_count   # host.json's: then the message goes to poison
        self.poisoned: list[Job] = []
        self.client = queue_client(world.settings, world.settings.sync_queue_name)
        with contextlib.suppress(ResourceExistsError):
            self.client.create_queue()
        self.stats = PumpStats()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the worker threads (again, after ``stop``)."""
        self._stop.clear()
        self._threads = [t for t in self._threads if t.is_alive()]
        for i in range(self.workers):
            thread = threading.Thread(target=self._loop, name=f"pump-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.client.receive_message(visibility_timeout=self.visibility_s)
                if message is None:
                    time.sleep(0.05)
                    continue
                self._run(message)
            except Exception:
                log.exception("pump error")

    def _run(self, message: Any) -> None:
        world = self.world
        body = message.content.decode() if isinstance(message.content, bytes) else message.content
        job = decode_job(body)
        if message.dequeue_count > self.max_dequeue_count:
            log.warning("poison: %s failed %d deliveries", job, self.max_dequeue_count)
            self.poisoned.append(job)
            self.client.delete_message(message.id, message.pop_receipt)
            return
        KillableState.dead.value = False
        keeper = _VisibilityKeeper(self.client, message, self.visibility_s)
        try:
            actions = getattr(world, "actions", None)   # set by the user actor (tests/sync/user_actor.py)
            if job.kind == JobKind.ACTION and actions is not None:
                actions.run_job(job, world.events)   # the user's actions (mailsync.actions)
                outcome = Outcome.DONE
            else:
                outcome = world.engine.handle(job, Delivery(message.id, message.dequeue_count), world.events)
        except WorkerKilled:
            self.stats.kills += 1
            return   # the message reappears after its visibility timeout, lease and slot still held
        except Exception as exc:
            self.stats.failures += 1
            log.info("invocation failed (%s); the message will be redelivered", type(exc).__name__,
                     exc_info=not isinstance(exc, InjectedFault))
            return
        finally:
            keeper.stop()
            KillableState.dead.value = False
            self.stats.runs += 1
        self.stats.outcomes[outcome.value] = self.stats.outcomes.get(outcome.value, 0) + 1
        self.client.delete_message(message.id, keeper.pop_receipt)

    def pending(self) -> int:
        return int(self.client.get_queue_properties().approximate_message_count or 0)

    def drain(self, timeout_s: float = 120.0, *, stalled_s: float = 60.0) -> float:
        """Wait until the queue is empty, three looks in a row; returns seconds waited.

        A message being worked on still counts (it is only deleted once its
        job is done), and a job enqueues its follow-ups before that. Gives up
        after ``timeout_s``, or earlier when no job has finished for
        ``stalled_s``; either way the error says what is still queued and
        what every worker is doing.
        """
        start = time.monotonic()
        quiet = 0
        runs, last_progress = self.stats.runs, start
        while True:
            now = time.monotonic()
            if self.stats.runs != runs:
                runs, last_progress = self.stats.runs, now
            if now - start >= timeout_s or now - last_progress >= stalled_s:
                break
            if self.pending() == 0:
                quiet += 1
                if quiet >= 3:
                    return time.monotonic() - start
            else:
                quiet = 0
            time.sleep(0.1)
        raise TimeoutError(f"queue did not drain in {time.monotonic() - start:.0f} s "
                           f"(last job finished {time.monotonic() - last_progress:.0f} s ago)\n{self.describe()}")

    def describe(self) -> str:
        """What is queued, what the sync rows say, and where each worker thread is (for a failing drain)."""
        lines = [f"pump: {self.stats}, poisoned: {self.poisoned}"]
        for message in self.client.peek_messages(max_messages=32):
            body = message.content.decode() if isinstance(message.content, bytes) else message.content
            job = decode_job(body)
            lines.append(f"  queued {job.kind} folder={job.folder_id} attrs={job.attrs} "
                         f"dequeued={message.dequeue_count}")
        now = time.time()
        rows = self.world.state.load(self.world.account_id)
        lines.append(f"  slots busy: {rows.slots_busy}")
        for row in [*([rows.folder_list] if rows.folder_list else []), *rows.folders.values()]:
            lines.append(f"  row {row.folder_id or '(folder list)'}: {row.phase.value} rounds={row.rounds} "
                         f"dirty={row.dirty} failures={row.failures} leased={row.leased(now)} "
                         f"not_before={max(0.0, row.not_before - now):.1f}s")
        frames = sys._current_frames()
        for thread in self._threads:
            frame = frames.get(thread.ident or -1)
            if frame is not None:
                where = "".join(traceback.format_stack(frame)[-4:])
                lines.append(f"  {thread.name}:\n{where}")
        return "\n".join(lines)


class AccountWorld:
    """What every world (Graph here, IMAP in test_imap_convergence) does with its one linked account."""

    account: Account
    queue: FaultyQueue
    tables: LinkingTables

    @property
    def account_id(self) -> str:
        return self.account.account_id

    def start_initial_sync(self) -> None:
        self.queue.enqueue(new_job(JobKind.SYNC_FOLDERS, self.account_id, reason="linked"))

    def account_status(self) -> AccountStatus:
        account = self.tables.accounts.get(self.account_id)
        assert account is not None
        return account.status


def change_during_sync(world: AccountWorld, mutate: Callable[[threading.Event], None], *,
                       enough: Callable[[], bool], timeout_s: float) -> None:
    """Run ``mutate(stop)`` on its own thread while the initial sync runs.

    It is stopped once ``enough()`` holds and the account is synced, or
    after ``timeout_s`` — whichever comes first.
    """
    stop = threading.Event()
    mutator = threading.Thread(target=mutate, args=(stop,), name="person", daemon=True)
    mutator.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if enough() and world.account_status() == AccountStatus.SYNCED:
            break
        time.sleep(0.2)
    stop.set()
    mutator.join(timeout=60)


@dataclass
class SyncWorld(AccountWorld):
    settings: Settings
    sandbox: SandboxTestServer
    user: SandboxUser
    store: SearchStore
    tables: LinkingTables
    state: SyncStateTable
    queue: FaultyQueue
    engine: SyncEngine
    account: Account
    events: RecordingPublisher
    tokens: SandboxTokens
    rng: random.Random
    token: str = ""                 # the account's bearer (for the API's services)
    actions: Any = None             # a MessageActionService the pump runs ACTION jobs with

    def wait_out_delta_lag(self) -> None:
        """Sleep as long as the sandbox's delta lags behind changes (Outlook's delta shows a change a
        little after it is made; a person links an account, or a poll comes, long after their changes)."""
        lag_s = float(self.sandbox.admin("GET", "config").json().get("delta_lag_s") or 0.0)
        if lag_s:
            time.sleep(lag_s + 0.1)

    def start_initial_sync(self) -> None:
        self.wait_out_delta_lag()
        super().start_initial_sync()

    def poll(self) -> None:
        """What the polling fallback does: the folder list and every known folder, incrementally
        (after the delta lag: the product polls long after the last change; here it may follow at once)."""
        self.wait_out_delta_lag()
        self.queue.enqueue(new_job(JobKind.SYNC_FOLDERS, self.account_id, reason="poll"))
        for folder_id in self.state.load(self.account_id).folders:
            self.queue.enqueue(new_job(JobKind.SYNC_FOLDER, self.account_id, folder_id, reason="poll"))


def world_settings(storage_env: dict[str, str], sandbox: SandboxTestServer, **overrides: str) -> Settings:
    """The engine's settings for a world on ``sandbox``: a 10 s budget, 50-message pages, 30 s leases."""
    env = {**storage_env, "GRAPH_SANDBOX_URL": sandbox.base_url, "SYNC_TIME_BUDGET_S": "10",
           "GRAPH_PAGE_SIZE": "50", "FOLDER_LEASE_S": "30", **overrides}
    return Settings.from_env(env)


def make_world(settings: Settings, sandbox: SandboxTestServer, store: SearchStore, *, user_index: int = 0,
               seed: int = 0, **engine_options: Any) -> SyncWorld:
    """Seed a linked account (status syncing, real sandbox token) and build the engine around it."""
    user = sandbox.users[user_index]
    tables = linking_tables(settings)
    now = datetime.now(UTC).replace(microsecond=0)
    account_id = uuid.uuid4().hex
    token, token_hash = issue_access_token(account_id)
    account = tables.accounts.save(Account(
        account_id=account_id, provider=Provider.OUTLOOK, status=AccountStatus.SYNCING,
        access_token_hash=token_hash, created_at=now, updated_at=now, address=user.mail,
        display_name=user.display_name))
    state = sync_table(settings, lease_s=settings.folder_lease_s, slot_ttl_s=2 * settings.sync_time_budget_s + 60,
                       table_class=KillableState)
    rng = random.Random(seed)
    queue = FaultyQueue(AzureJobQueue(settings), rng)
    tokens = SandboxTokens(sandbox, user.mail)
    engine = SyncEngine(settings, accounts=tables.accounts, providers=GraphProviderFactory(settings, tokens),
                        store=store, state=state, queue=queue, rng=random.Random(seed + 1), **engine_options)
    return SyncWorld(settings, sandbox, user, store, tables, state, queue, engine, account, RecordingPublisher(),
                     tokens, rng, token=token)


# --- comparing the store with the mailbox ------------------------------------------------------

@dataclass(frozen=True)
class View:
    folders: dict[str, tuple[str, str | None]]            # id -> (name, parent id)
    messages: dict[str, tuple[Any, ...]]                  # id -> the fields the list shows


def _message_key(folder_id: str, subject: str, is_read: bool, flag: str, categories: tuple[str, ...],
                 importance: str, sender: str, received: datetime | None, modified_s: int) -> tuple[Any, ...]:
    return (folder_id, subject, is_read, flag, tuple(sorted(categories)), importance, sender,
            received.isoformat() if received else None, modified_s)


def sandbox_view(snapshot: dict[str, Any]) -> View:
    folders = {f["id"]: (f["displayName"], f["parentFolderId"]) for f in snapshot["folders"]}
    messages = {}
    for m in snapshot["messages"]:
        received = datetime.fromisoformat(m["receivedDateTime"]) if m["receivedDateTime"] else None
        modified = int(datetime.fromisoformat(m["lastModifiedDateTime"]).timestamp())
        messages[m["id"]] = _message_key(m["folderId"], m["subject"], m["isRead"], m["flagStatus"],
                                         tuple(m["categories"]), m["importance"], (m["from"] or {}).get("address", ""),
                                         received, modified)
    return View(folders, messages)


def iter_store_messages(store: SearchStore, account_id: str) -> Iterator[Any]:
    cursor: str | None = None
    while True:
        page = store.list_messages(account_id, MessageQuery(limit=500, cursor=cursor))
        yield from page.messages
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def store_view(store: SearchStore, account_id: str) -> View:
    store.refresh()
    folders = {v.folder.folder_id: (v.folder.name, v.folder.parent_id) for v in store.list_folders(account_id)}
    messages = {}
    for m in iter_store_messages(store, account_id):
        messages[m.message_id] = _message_key(
            m.folder_id, m.subject, m.is_read, m.flag_status.value, m.categories, m.importance,
            m.sender.address if m.sender else "", m.received_at, m.version // 1000)
    return View(folders, messages)


@dataclass(frozen=True)
class Diff:
    missing: list[str]
    extra: list[str]
    stale: list[tuple[str, tuple[Any, ...], tuple[Any, ...]]]
    folders_missing: list[str]
    folders_extra: list[str]
    folders_stale: list[str]

    def __bool__(self) -> bool:
        return any((self.missing, self.extra, self.stale, self.folders_missing, self.folders_extra,
                    self.folders_stale))

    def summary(self) -> str:
        return (f"missing={len(self.missing)} extra={len(self.extra)} stale={len(self.stale)} "
                f"folders missing={self.folders_missing} extra={self.folders_extra} stale={self.folders_stale}; "
                f"first stale: {self.stale[:2]}")


def diff(store: View, truth: View) -> Diff:
    return Diff(
        missing=sorted(set(truth.messages) - set(store.messages)),
        extra=sorted(set(store.messages) - set(truth.messages)),
        stale=[(mid, store.messages[mid], truth.messages[mid]) for mid in sorted(truth.messages)
               if mid in store.messages and store.messages[mid] != truth.messages[mid]],
        folders_missing=sorted(set(truth.folders) - set(store.folders)),
        folders_extra=sorted(set(store.folders) - set(truth.folders)),
        folders_stale=sorted(f for f in truth.folders if f in store.folders and store.folders[f] != truth.folders[f]),
    )


def compare(world: SyncWorld) -> Diff:
    return diff(store_view(world.store, world.account_id), sandbox_view(world.sandbox.snapshot(world.user)))


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError("condition not reached")


def encode(job: Job) -> str:
    return encode_job(job)
