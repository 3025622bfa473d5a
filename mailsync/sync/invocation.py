"""What one sync job's run holds, and the services every part of it shares.

An invocation (``mailsync.sync.engine``) works its target — the folder list
(``mailsync.sync.folder_list``) or folders (``mailsync.sync.folder_rounds``)
— holding a request slot, a provider session and a deadline. This module
is their common base: the counters and rows they share, the account's
status and the events the page sees, the waits and continuations, and the
plumbing around the sync table.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from mailsync.errors import Conflict, LeaseLost, MailsyncError, NotFound
from mailsync.jobs import EXPECT, SUBSCRIBED, Expected, JobKind, JobOutbox, WakingJobQueue
from mailsync.models import Account, AccountStatus, Job, Mailbox, Message, Provider, SyncPhase, SyncProgress
from mailsync.ports import EventPublisher, JobQueue, MailProvider
from mailsync.storage.sync_rows import AccountSyncState, Lease, Released, Slot, SyncState, new_owner
from mailsync.sync import policy

if TYPE_CHECKING:
    from mailsync.sync.engine import SyncEngine

log = logging.getLogger("mailsync.sync")
_T = TypeVar("_T")

CONTINUATION = "continuation"
RELOOK = "relook"            # job reason and attribute (the attempt) of a look-again after a quiet round
# Rounds that look again: notified ones, and the folder-list round asked for when the folder
# subscription was created (it covers the folder changes made before, which no notification will).
NOTIFIED_REASONS = frozenset({"notified", RELOOK, SUBSCRIBED})
# What the account shows when its provider refuses the stored sign-in, keyed by ``Account.provider``.
REAUTH_MESSAGES: dict[Provider, str] = {
    Provider.OUTLOOK: "Outlook asked for the account to be signed in again.",
    Provider.IMAP: "The IMAP server refused the saved password; link the account again with the current one.",
}

FOLDER_LIST = "\x00folder-list"   # sentinel target: the folder list (never a provider folder id)
RELOOK_COVERED = -1.0             # InvocationBase.relook_claim: a pending look-again covers this round's


def relook_attempt(job: Job) -> int:
    """Which look-again ``job`` is (1, 2...); 0 for any other job."""
    try:
        return int(job.attrs.get(RELOOK, "0")) if job.reason == RELOOK else 0
    except ValueError:
        return 0


class Outcome(enum.StrEnum):
    """What an invocation did (for logs and tests)."""

    DONE = "done"            # worked; nothing or a continuation left
    BUSY = "busy"            # every slot of the mailbox busy: target marked dirty
    HELD = "held"            # the mailbox is throttled: target marked dirty, the job comes back after
    DEFERRED = "deferred"    # a fault: the job comes back later through the queue
    DROPPED = "dropped"      # unknown / deleted / inactive account
    REAUTH = "reauth"        # the account needs the user to sign in again


@dataclass(frozen=True)
class Delivery:
    """The queue delivery of a job: ``delivery_id`` is the same for redeliveries of one message."""

    delivery_id: str
    dequeue_count: int = 1


class StopInvocation(Exception):
    """Ends the invocation early (deferred, reauth); carries the outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class InvocationBase:
    """The state of one job's run: slot, provider session, deadline, counters."""

    def __init__(self, engine: SyncEngine, account: Account, job: Job, delivery: Delivery,
                 events: EventPublisher, wake: JobOutbox | None = None) -> None:
        self.e = engine
        # The continuations this run enqueues (a new account's fan-out to its folders, a round out of
        # time): with ``wake`` (the function's queue output binding on the sync queue), one that is to
        # run now also puts a WAKE there, so the host's listener polls as the invocation returns
        # instead of after its idle back-off (mailsync.jobs.WakingJobQueue). The fan-out of a new
        # account's folders waited 0.1-1.6 s for that poll (bench/README.md, "the fan-out's wake").
        self.queue: JobQueue = engine.queue if wake is None else WakingJobQueue(engine.queue, wake)
        self.account = account
        self.account_id = account.account_id
        self.job = job
        self.events = events
        self.owner = new_owner(delivery.delivery_id)
        self.is_continuation = job.attrs.get(CONTINUATION) == "1"
        self.started = engine.clock()
        self.deadline = self.started + engine.settings.sync_time_budget_s
        self._provider: MailProvider | None = None
        self._generation: str | None = None
        self.rows: AccountSyncState | None = None
        self.rows_current = False    # self.rows was read after this invocation's last sync-row write
        self.pages = 0
        self.upserted = 0
        self.removed_count = 0
        self.followed = False        # published changes of an incremental round: end soon
        self.end_now = False         # first screen done, fan-out enqueued...
        self.continued = False       # a continuation is already on the queue
        self.changed: set[str] = set()   # folders whose pages this invocation wrote changes of
        self.rounds_done = 0             # folder rounds this invocation read to their end
        # An every-folder sweep that found nothing of the account read yet: its rounds are the first
        # (a new account's initial sync after its subscriptions; the engine's _sweep_again).
        self.first_sweep = False
        # A notified round run by its NOTIFIED job: what it must read to need no look-again, and what
        # it read of its folder (message id -> version tag, "" without one; None: read leaving it).
        self.expected = Expected.decode(job.attrs.get(EXPECT)) \
            if job.reason == "notified" and job.kind == JobKind.SYNC_FOLDER else None
        self.seen: dict[str, str | None] = {}
        # A notified round or its look-again: one folder round, then the invocation ends (pending rows
        # others left go to a continuation from the end's read, as ever). The slot and the lease are
        # taken in one table transaction, the round's finish gives the slot back in another.
        self.one_round = job.kind == JobKind.SYNC_FOLDER and job.reason in NOTIFIED_REASONS
        self.slot: Slot | None = None
        self.pretaken: Lease | None = None   # the target's lease, taken with the slot
        self.took_from: AccountSyncState | None = None   # the rows that slot and lease were taken from
        self.released: Released | None = None   # the round's row and the slot, given back together (unsignalled)
        # The look-again of a notified round, claimed with the round's finish: its due time (claimed),
        # RELOOK_COVERED (one pending covers it), or None (decided after the run, the claim on its own).
        self.relook_claim: float | None = None

    def _relook_delay(self, target: str) -> float | None:
        """The wait before the look-again this notified round of ``target`` needs, or None (it needs none).

        Delta lags behind notifications (``SyncEngine``'s ``_relook_if_quiet`` says why); a
        look-again that found something, or a round that read the notified versions, needs none.
        """
        attempt = relook_attempt(self.job)
        if target in self.changed and attempt:
            return None                        # a look-again that found something: the lagging change surfaced
        if not attempt and self.expected is not None and self.expected.met_by(self.seen):
            return None                        # it read the very versions its notifications announced
        return policy.relook_delay(attempt)

    def _come_back(self, target: str, delay_s: float, *, reason: str) -> None:
        self._enqueue_continuation(None if target is FOLDER_LIST else target, reason=reason, delay_s=max(0.0, delay_s))

    def _enqueue_continuation(self, folder_id: str | None, *, reason: str, delay_s: float = 0.0) -> None:
        self.queue.enqueue(self.e.continuation(self.account_id, folder_id, reason=reason), delay_s=delay_s)
        self.continued = True

    def _defer(self, lease: Lease, wait: policy.Wait, *, requeue: bool = True) -> None:
        """Give the folder back and come back after ``wait`` through the queue."""
        e = self.e
        failures = lease.state.failures + 1
        now = e.clock()
        try:
            e.state.release(lease, failures=failures)
            e.state.mark(self.account_id, lease.state.folder_id, dirty=False, not_before=now + wait.seconds)
            if wait.mailbox_wide:
                e.state.mark(self.account_id, None, dirty=False, not_before=now + wait.seconds)
        except LeaseLost:
            return
        if requeue and failures < policy.MAX_FAILURES:
            self._enqueue_continuation(lease.state.folder_id, reason=wait.reason, delay_s=wait.seconds)
        elif requeue:
            log.error("folder keeps failing; parked until the next change or poll",
                      extra={"failures": failures, "reason": wait.reason})
        self.end_now = True

    def _retrying(self, call: Callable[[], _T], *, attempt: int = 0) -> _T:
        """A provider or store call, with short transient waits slept in place; other faults propagate.

        ``attempt``: the failed tries already made (their waits grow the next one).
        """
        while True:
            try:
                return call()
            except MailsyncError as exc:
                if not policy.retryable(exc):
                    raise
                wait = policy.wait_for(exc, attempt=attempt, failures=0, time_left_s=self._time_left(),
                                       rng=self.e.rng, cap_s=self.e.backoff_cap_s)
                if not wait.in_place:
                    raise
                attempt += 1
                self.e.sleep(wait.seconds)

    # --- account status, events ---------------------------------------------------------------

    def _maybe_synced(self, rows: AccountSyncState) -> None:
        generation = self._store_generation()
        if rows.folder_list is None or not policy.round_done(rows.folder_list, generation):
            return
        if not all(policy.round_done(row, generation) for row in rows.folders.values()):
            return
        if not self._update_account(lambda account: replace(
                account, status=AccountStatus.SYNCED, updated_at=datetime.now(UTC), error=None)
                if account.status == AccountStatus.SYNCING else None):
            return
        log.info("account synced", extra={"elapsed_s": round(self.e.clock() - self.started, 3)})
        self._upsert_mailbox(AccountStatus.SYNCED)
        self._publish_progress(None, "synced", rows)

    def _store_lost(self) -> None:
        """The store was recreated under a synced account: it is ``syncing`` again until every folder is back.

        Its list is empty meanwhile, so ``synced`` would be a lie; ``_maybe_synced``
        sets it back once every row has completed a round in the new generation.
        """
        if self._update_account(lambda account: replace(
                account, status=AccountStatus.SYNCING, updated_at=datetime.now(UTC))
                if account.status == AccountStatus.SYNCED else None):
            log.warning("the store was recreated: the account is syncing again")

    def _reauth(self, error: MailsyncError) -> None:
        log.warning("account needs to sign in again (%s)", error.code)
        self._update_account(lambda account: replace(
            account, status=AccountStatus.REAUTH_REQUIRED, error=REAUTH_MESSAGES[account.provider],
            updated_at=datetime.now(UTC)) if account.status != AccountStatus.REAUTH_REQUIRED else None)
        self._upsert_mailbox(AccountStatus.REAUTH_REQUIRED)
        self._publish_progress(None, AccountStatus.REAUTH_REQUIRED.value, self._load())

    def _update_account(self, change: Callable[[Account], Account | None]) -> bool:
        """Save ``change(account)`` over the account as read now; ``change`` answers None to leave it.

        Tried first on the account as this invocation holds it (read when the job began: the save is
        conditional on its ETag, so a copy changed since is refused, never overwritten); then, like on
        an ETag conflict, on a fresh read, three tries in all. A change the held copy declines is asked
        again of a fresh read (the copy may be older than what it decides on). True if this call saved
        it; False if the account is gone, ``change`` declined, or it kept racing.
        """
        held: Account | None = self.account if self.account.etag is not None else None
        for _ in range(3):
            account = held if held is not None else self.e.accounts.get(self.account_id)
            changed = change(account) if account is not None else None
            if changed is None:
                if held is None:
                    return False
                held = None
                continue
            try:
                self.account = self.e.accounts.save(changed)
            except Conflict:
                held = None
                continue
            except NotFound:
                return False          # unlinked meanwhile
            return True
        return False

    def _upsert_mailbox(self, status: AccountStatus) -> None:
        rows = self.rows
        total = sum(r.indexed for r in rows.folders.values()) if rows else None
        self.e.store.upsert_mailbox(Mailbox(
            account_id=self.account_id, address=self.account.address or "",
            display_name=self.account.display_name or "", provider=self.account.provider, status=status,
            total_messages=total, last_sync_at=datetime.now(UTC)))

    def _publish_folder_phase(self, state: SyncState, phase: SyncPhase) -> None:
        """Show the folder's new phase; its name and parent are the folder list's to write.

        The row in our lease may be minutes old: the folder list can rename
        or move the folder (store first, then the row) while we page it, and
        writing the whole folder from our copy would put the old name back
        for good (the folder list's next rounds only report changed folders).
        It may also have removed the folder after our ``finish``: then there
        is nothing to show, and nothing may be recreated.
        """
        if state.folder_id is None:
            return
        self.e.store.set_folder_phase(self.account_id, state.folder_id, phase.value)

    def _publish_progress(self, folder_id: str | None, phase: str, rows: AccountSyncState | None, *,
                          live: SyncState | None = None) -> None:
        rows = rows or self.rows
        folders = dict(rows.folders) if rows else {}
        if live is not None and live.folder_id is not None:
            folders[live.folder_id] = live
        elapsed = max(self.e.clock() - self.started, 1e-6)
        self.events.publish_progress(SyncProgress(
            account_id=self.account_id, phase=phase, folder_id=folder_id,
            folders_done=sum(1 for r in folders.values() if r.rounds > 0), folders_total=len(folders),
            messages_indexed=sum(r.indexed for r in folders.values()),
            rate_per_s=round(self.upserted / elapsed, 1)))

    # --- plumbing -------------------------------------------------------------------------

    def _load(self) -> AccountSyncState:
        self.rows = self.e.state.load(self.account_id)
        return self.rows

    def _known(self, folder_id: str | None) -> SyncState | None:
        """The row as this invocation last loaded it (a first guess for a conditional write), if any."""
        if self.rows is None:
            return None
        return self.rows.folder_list if folder_id is None else self.rows.folders.get(folder_id)

    def _store_generation(self) -> str:
        if self._generation is None:
            self._generation = self.e.store.generation()
        return self._generation

    def _provider_(self) -> MailProvider:
        if self._provider is None:
            self._provider = self.e.providers.open(self.account)
        return self._provider

    def _close_provider(self) -> None:
        if self._provider is not None:
            try:
                self._provider.close()
            finally:
                self._provider = None

    def _time_left(self) -> float:
        return self.deadline - self.e.clock()

    def _acquire_quietly(self, folder_id: str | None) -> Lease | None:
        """Take a lease without marking the row dirty when busy (continuations, first screen).

        Like ``acquire``, it takes over a lease held by an earlier delivery of
        the same queue message (that worker died mid-page).
        """
        try:
            return self.e.state.acquire(self.account_id, folder_id, self.owner, mark_busy=False,
                                        known=self._known(folder_id))
        except LeaseLost:
            return None

    def _release_quietly(self, lease: Lease | None) -> None:
        if lease is None:
            return
        try:
            self.e.state.release(lease)
        except (LeaseLost, MailsyncError) as exc:
            log.info("release after failure did not go through: %s", exc.code)


def all_rows(rows: AccountSyncState) -> list[SyncState]:
    found = list(rows.folders.values())
    if rows.folder_list is not None:
        found.insert(0, rows.folder_list)
    return found


def kept(messages: Sequence[Message], stale_ids: Sequence[str]) -> list[Message]:
    """The messages the store kept: a write it refused as older is not shown on the page either.

    A delta page read before a user action is refused by the store (the
    action's optimistic row is newer, mailsync.actions.versions); publishing
    it anyway would put the old value back on every open page — the action
    undone on screen while the store still has it.
    """
    if not stale_ids:
        return list(messages)
    refused = set(stale_ids)
    return [m for m in messages if m.message_id not in refused]
