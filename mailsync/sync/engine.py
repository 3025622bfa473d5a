"""The sync engine: makes the store equal to the mailbox, and keeps it so.

How it works
============

Work arrives as queue jobs that only *name* an account (and maybe a
folder); all state lives in the sync table (``mailsync.storage.cursors``):
one row for the account's folder list and one per folder, each with the
provider's opaque cursor, a phase, an epoch, counts, a ``dirty`` flag and a
lease. A job therefore never carries work that could be lost, duplicated or
reordered: running any job twice, late, or in parallel with another is
harmless, because the rows decide what is left to do.

An invocation (one job) goes like this::

    job ──► account linked and active? ──no──► drop
              │yes
              ▼
        take a request slot (≤ 4 per mailbox) ──none──► mark target dirty,
              │                                         try once more ──► exit
              ▼
        free what our dead earlier delivery held
              │
              ▼
        mailbox held back (429)? ──yes──► mark the target dirty, come back
              │no                         when the hold ends ──► exit
              ▼
        work the target (folder list or one folder) ◄──────────────┐
              │                                                    │
              ▼                                                    │
        time left, nobody waiting on our events? ──yes── next pending row
              │no
              ▼
        give the slot back; pending rows left? ──yes──► enqueue a continuation
        (or rows backing off: a continuation for when the first is due)

Each row (the folder list, or a folder) moves through these phases::

                   ┌───────────────── resync requested, 410 Gone, ────────────┐
                   │                  store generation changed                │
                   ▼                                                          │
     (new) ──► INITIAL ──round complete──► INCREMENTAL ──round complete──┐    │
                   ▲        (remove_stale)      ▲   │                    │    │
                   │                            │   └────────────────────┘    │
                   └──── cursor lost ──         └──round complete── RESYNC ◄──┘
                                                     (remove_stale)

A *round* pages the provider's change stream from the saved cursor until
the provider says the round is complete (Graph's deltaLink). A *full* round
(INITIAL, RESYNC) starts from no cursor in a new, larger epoch; every write
of the round carries that epoch, and when it completes, the folder's
documents of older epochs — the ones the round did not see — are removed.
So a resync never blanks the list: everything stays until it is known to
be gone.

Per page: read (one request, while the previous page is being written:
``mailsync.sync.pipeline``), bulk-upsert the messages (the store skips
versions older than it holds), conditionally remove the removals (only if
the stored copy still names this folder: a moved message may have been
written by its new folder first), then save the cursor. The cursor is
saved only after the writes are acknowledged, so a crash anywhere repeats
at most one page, and repeating a page is idempotent.

The lease and ``dirty`` (see cursors.py for the protocol): one worker at a
time pages a folder. A job that finds the folder leased sets ``dirty`` and
exits; the holder, when its round completes, sees ``dirty`` and runs one
more round before releasing. Since a round reads every change made before
it started, a change is always followed by a round that sees it — which is
why notifications that arrive during the initial sync, or twice, or out of
order, lose nothing and never page a folder in parallel.

Faults: 429/503/504 and cut pages wait ``Retry-After`` (else exponential
back-off with jitter, ``mailsync.sync.policy``); short waits are slept in
place, long ones give the lease and slot back and re-enqueue the job with a
visibility delay (a 429 also holds the whole mailbox back for that long).
410 or an unreadable cursor restarts the folder (RESYNC). 401 has already
been retried once with a fresh token by the Graph client; if it persists,
or the grant is gone, the account becomes ``reauth_required`` and its jobs
stop. An unexpected exception gives the lease and slot back and propagates,
so the queue redelivers the message (which may also take over a lease its
own earlier delivery held, if that worker was killed).

Order of the initial sync: the folder list first (it creates the folder
rows), then the first screen — the newest 50 Inbox messages, written in
the Inbox's *current* epoch so the Inbox's first full round (one epoch
later) rewrites or removes them — in its own short invocation, so they
reach the page within a second or two; then the folders, Inbox first,
others largest first, up to four at a time. The account becomes ``synced``
when every folder has completed its first round.
"""

from __future__ import annotations

import enum
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from mailsync.errors import (
    Conflict,
    CursorExpired,
    LeaseLost,
    MailsyncError,
    NotFound,
    ProviderAuthError,
    ReauthRequired,
)
from mailsync.jobs import EVERY_FOLDER, EXPECT, STAND_IN_SWEEPS, SUBSCRIBED, Expected, JobKind, new_job
from mailsync.logs import log_context
from mailsync.models import (
    Account,
    AccountStatus,
    Folder,
    Job,
    Mailbox,
    Message,
    MessageBatch,
    MessagesChanged,
    Provider,
    SyncPhase,
    SyncProgress,
)
from mailsync.ports import AccountRepository, EventPublisher, JobQueue, MailProvider, MessageStore, ProviderFactory
from mailsync.settings import Settings
from mailsync.storage.cursors import (
    AccountSyncState,
    Lease,
    Slot,
    SyncState,
    SyncStateTable,
    delivery_of,
    new_owner,
)
from mailsync.sync import policy
from mailsync.sync.pipeline import PageReader

log = logging.getLogger("mailsync.sync")
_T = TypeVar("_T")

ACTIVE_STATUSES = (AccountStatus.SYNCING, AccountStatus.SYNCED)
CONTINUATION = "continuation"
RELOOK = "relook"            # job reason and attribute (the attempt) of a look-again after a quiet round
# Rounds that look again: notified ones, and the folder-list round asked for when the folder
# subscription was created (it covers the folder changes made before, which no notification will).
NOTIFIED_REASONS = frozenset({"notified", RELOOK, SUBSCRIBED})
# Largest bulk the engine sends at once when pages pile up behind a slow store.
MAX_BULK_MESSAGES = 2_000
READ_AHEAD_PAGES = 2
# What the account shows when its provider refuses the stored sign-in, keyed by ``Account.provider``.
REAUTH_MESSAGES: dict[Provider, str] = {
    Provider.OUTLOOK: "Outlook asked for the account to be signed in again.",
    Provider.IMAP: "The IMAP server refused the saved password; link the account again with the current one.",
}


def _relook_attempt(job: Job) -> int:
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


class _Stop(Exception):
    """Ends the invocation early (deferred, reauth); carries the outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class SyncEngine:
    """Runs sync jobs. One instance per process; ``handle`` is thread-safe."""

    def __init__(self, settings: Settings, *, accounts: AccountRepository, providers: ProviderFactory,
                 store: MessageStore, state: SyncStateTable, queue: JobQueue,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, backoff_cap_s: float = policy.BACKOFF_CAP_S) -> None:
        self.settings = settings
        self.accounts = accounts
        self.providers = providers
        self.store = store
        self.state = state
        self.queue = queue
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.backoff_cap_s = backoff_cap_s
        # Test seam: called with (folder_id, page number) before a page is written.
        self.before_write: Callable[[str, int], None] | None = None

    def handle(self, job: Job, delivery: Delivery, events: EventPublisher, *,
               account: Account | None = None) -> Outcome:
        """Run one sync job (SYNC_FOLDERS, SYNC_FOLDER, RESYNC_FOLDER, RESYNC_ACCOUNT).

        ``account``: the account as the caller has just read it (a NOTIFIED job
        running the job in its own invocation); else it is read here.
        """
        with log_context(account_id=job.account_id, job_id=job.job_id, folder_id=job.folder_id):
            if account is None or account.account_id != job.account_id:
                account = self.accounts.get(job.account_id)
            if account is None:
                # Unlinked meanwhile: its documents are gone; drop its sync rows too.
                self.state.delete_account(job.account_id)
                log.info("job for an unknown account dropped", extra={"kind": job.kind})
                return Outcome.DROPPED
            if account.status not in ACTIVE_STATUSES:
                log.info("job dropped: account is %s", account.status.value, extra={"kind": job.kind})
                return Outcome.DROPPED
            run = _Invocation(self, account, job, delivery, events)
            outcome = run.run()
            log.info("sync job %s", outcome.value, extra={
                "kind": job.kind, "pages": run.pages, "upserted": run.upserted, "removed": run.removed_count,
                "elapsed_s": round(self.clock() - run.started, 3)})
            return outcome

    def continuation(self, account_id: str, folder_id: str | None, *, reason: str) -> Job:
        kind = JobKind.SYNC_FOLDERS if folder_id is None else JobKind.SYNC_FOLDER
        return new_job(kind, account_id, folder_id, reason=reason, attrs={CONTINUATION: "1"})


class _Invocation:
    """The state of one job's run: slot, provider session, deadline, counters."""

    def __init__(self, engine: SyncEngine, account: Account, job: Job, delivery: Delivery,
                 events: EventPublisher) -> None:
        self.e = engine
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

    # --- the invocation ------------------------------------------------------------

    def run(self) -> Outcome:
        e = self.e
        rows = self._load()
        if rows.folder_list is None:
            e.state.create(SyncState(account_id=self.account_id, folder_id=None, phase=SyncPhase.INITIAL,
                                     epoch=policy.next_epoch(0, e.clock())))
            rows = self._load()
        target = self._target(rows)
        assert rows.folder_list is not None
        taken = e.state.take_slot_and_lease(rows, target, self.owner, e.settings.graph_max_concurrency,
                                            news=target == self.job.folder_id) \
            if self._takes_both(rows, target) else None
        if taken is not None:
            slot, self.pretaken = taken
        else:
            found = e.state.acquire_slot(self.account_id, self.owner, e.settings.graph_max_concurrency, known=rows)
            if found is None:
                self._remember(target, rows)
                # A holder may have left between our two looks: it re-checks pending
                # rows after giving its slot back, we re-check slots after marking.
                found = e.state.acquire_slot(self.account_id, self.owner, e.settings.graph_max_concurrency)
                if found is None:
                    # The slot holder runs the marked row next, maybe inside delta's lag (an initial
                    # sync holds every slot for minutes): a notified job looks again all the same.
                    self._relook_if_quiet(Outcome.BUSY)
                    return Outcome.BUSY
            slot = found
        self.slot = slot
        outcome = Outcome.DONE
        try:
            # Even when held: a redelivery frees what its dead run held (its slot
            # was just taken over above), or those rows would wait for their leases to lapse.
            self._reclaim_dead_leases(rows)
            held_s = rows.folder_list.not_before - e.clock()
            if held_s > 0:
                # The mailbox is throttled: leave the intent and come back when the hold
                # ends. Dropping the job instead could end the account's last chain of
                # continuations, leaving its pending folders to the next poll (hours).
                self._remember(target, rows)
                self._come_back(target, held_s, reason="held")
                outcome = Outcome.HELD
            else:
                self._work(target)
            while outcome == Outcome.DONE and not self.end_now and not self.one_round \
                    and self._time_left() > 0.2 * e.settings.sync_time_budget_s:
                pending = self._next_pending()
                if pending is None:
                    break
                self._work(pending.folder_id if pending.folder_id is not None else _LIST)
        except _Stop as stop:
            outcome = stop.outcome
        finally:
            if self.pretaken is not None:      # taken with the slot, never used (held mailbox, a failure)
                self._release_quietly(self.pretaken)
            self._close_provider()
            if self.slot is not None:          # not given back with the round's finish
                e.state.release_slot(self.slot)
        wrote = bool(self.upserted or self.removed_count)
        if outcome != Outcome.REAUTH or wrote:
            rows = self._load()
            # Unlinked while we wrote? Then remove what we may have written after the unlink did.
            # The unlink deletes the documents, then these sync rows, then the account row
            # (mailsync.linking.service): a folder-list row gone from the read we make anyway is
            # the sign, seen no later than the account row's absence would be; the account row
            # confirms it. (This read was an account read per invocation that wrote.)
            if wrote and rows.folder_list is None and e.accounts.get(self.account_id) is None:
                e.store.delete_account(self.account_id)
                e.state.delete_account(self.account_id)
                return Outcome.DROPPED
        if outcome != Outcome.REAUTH:
            if self.account.status == AccountStatus.SYNCING:
                # Two workers finishing the last two folders at once may each see the
                # other's still running; whichever of us looks last sees both done.
                self._maybe_synced(rows)
            if outcome in (Outcome.DONE, Outcome.DEFERRED) and not self.continued:
                self._continue_pending()
            self._relook_if_quiet(outcome)
        return outcome

    def _takes_both(self, rows: AccountSyncState, target: str) -> bool:
        """Whether to take the slot and the target's lease together (``SyncStateTable.take_slot_and_lease``):
        a one-round invocation whose mailbox is not held back and that has no dead
        delivery's leases to reclaim first (those paths need the slot alone)."""
        if not self.one_round or target is _LIST or rows.folder_list is None \
                or rows.folder_list.not_before > self.e.clock():
            return False
        mine = delivery_of(self.owner)
        return not any(row.lease_owner and delivery_of(row.lease_owner) == mine for row in _all_rows(rows))

    def _relook_if_quiet(self, outcome: Outcome) -> None:
        """After a notified round, look again shortly: delta lags behind.

        Graph may notify a change before its delta shows it. Without this, a
        notification whose round ran too early is lost until the next poll
        (hours, with a healthy subscription). A notified round that found
        something looks again too: what it found may be an earlier change
        surfacing (one its own notification's round was too early for),
        while the change this notification is about is still hidden. A
        look-again that finds something stops. Bounded (policy.RELOOK_DELAYS_S)
        and coalesced: one look-again pending per folder, whatever the number
        of notifications (``SyncStateTable.schedule_relook``). When the folder
        was busy (its lease, or every request slot of the mailbox), its
        holder runs another round (dirty), which may be early too: the
        look-again covers that as well. Every-folder sweeps: ``_sweep_again``.
        """
        job = self.job
        if job.kind == JobKind.SYNC_FOLDERS and job.attrs.get(EVERY_FOLDER) == "1":
            self._sweep_again(outcome)
            return
        if job.reason not in NOTIFIED_REASONS or outcome not in (Outcome.DONE, Outcome.BUSY, Outcome.HELD):
            return
        folder_id = job.folder_id
        if job.kind == JobKind.SYNC_FOLDER and folder_id is not None:
            target = folder_id
        elif job.kind == JobKind.SYNC_FOLDERS:
            target, folder_id = _LIST, None    # a folder subscription's notification: names, parents, new folders
        else:
            return
        attempt = _relook_attempt(job)
        if target in self.changed and attempt:
            return                             # a look-again that found something: the lagging change surfaced
        if not attempt and self.expected is not None and self.expected.met_by(self.seen):
            # The round read the very versions its notifications announced (or their removal):
            # nothing they name is still inside delta's lag.
            log.info("notified round read the notified versions: no look-again")
            return
        delay = policy.relook_delay(attempt)
        if delay is None:
            return
        e = self.e
        # self.rows: read at the end of the run, after our last write (the claim is ETag-checked anyway).
        if not e.state.schedule_relook(self.account_id, folder_id, at=e.clock() + delay, known=self._known(folder_id)):
            return
        log.info("notified round: looking again", extra={"delay_s": delay, "attempt": attempt + 1})
        e.queue.enqueue(new_job(JobKind(job.kind), self.account_id, folder_id, reason=RELOOK,
                                attrs={RELOOK: str(attempt + 1)}), delay_s=delay)

    def _sweep_again(self, outcome: Outcome) -> None:
        """After a sweep standing in for notifications (``STAND_IN_SWEEPS``), sweep again, twice.

        Graph notifies only the changes made after a subscription exists; the
        sweep run when it is created is all that brings in the earlier ones
        (likewise after a ``missed`` event, or when a dead run took the
        notifications). Delta lags behind changes, so one made just before —
        a message moved to the Inbox right before linking, a flag set a second
        before the subscription — is not in the sweep's rounds, nor in a
        folder's first round starting inside the lag, and nothing else will
        ask again: it waited for the poll (hours). So the sweep runs again
        after each look-again delay (``policy.RELOOK_DELAYS_S``), whatever
        the earlier one found (a change found in one folder says nothing of
        another's) and whatever its outcome (a deferred or busy sweep left
        its marks on the rows; ours come later). Such sweeps are rare: this
        is two more incremental rounds per folder already started (``_target``
        marks only those; a first round not yet begun runs later anyway).
        """
        job = self.job
        if outcome in (Outcome.DROPPED, Outcome.REAUTH):
            return
        if job.reason in STAND_IN_SWEEPS:
            attempt = 0
        elif job.reason == RELOOK:
            attempt = _relook_attempt(job)
        else:
            return
        delay = policy.relook_delay(attempt)
        if delay is None:
            return
        log.info("sweep standing in for notifications: looking again",
                 extra={"delay_s": delay, "attempt": attempt + 1})
        self.e.queue.enqueue(new_job(JobKind.SYNC_FOLDERS, self.account_id, reason=RELOOK,
                                     attrs={EVERY_FOLDER: "1", RELOOK: str(attempt + 1)}), delay_s=delay)

    def _reclaim_dead_leases(self, rows: AccountSyncState) -> None:
        """Give back the leases an earlier delivery of this message held when its worker died.

        The worker may have been paging a folder it picked up after its own
        target; only this message's redelivery knows that worker is dead, so
        it frees those rows for whoever runs next (possibly itself).
        """
        mine = delivery_of(self.owner)
        for row in _all_rows(rows):
            if row.lease_owner and delivery_of(row.lease_owner) == mine:
                log.info("reclaiming a lease from a dead delivery", extra={"reclaimed_folder": row.folder_id})
                self._release_quietly(Lease(row, row.lease_owner))

    def _target(self, rows: AccountSyncState) -> str:
        kind, folder_id = self.job.kind, self.job.folder_id
        state = self.e.state
        if kind == JobKind.RESYNC_ACCOUNT:
            state.mark_many(self.account_id, [*rows.folders, None], dirty=False, resync=True)
            return _LIST
        if kind == JobKind.SYNC_FOLDERS and self.job.attrs.get(EVERY_FOLDER) == "1" and not self.is_continuation:
            # The intent goes on the rows first (one batch): whoever holds the slot, now or
            # later, works them; this invocation does the folder list, then picks them up.
            # A folder whose first round has not begun needs no mark: that round starts after
            # now, so it sees every change made before this job (onboarding: the sweep after
            # subscribing then costs nothing for the folders the initial sync has not reached).
            now = self.e.clock()
            started = [fid for fid, row in rows.folders.items()
                       if row.rounds > 0 or row.cursor or row.leased(now)]
            state.mark_many(self.account_id, started, dirty=True)
            return _LIST
        if folder_id is None or kind == JobKind.SYNC_FOLDERS:
            return _LIST
        if folder_id not in rows.folders:
            # Not in our folder list (yet): the folder list round creates it, or finds it gone.
            return _LIST
        if kind == JobKind.RESYNC_FOLDER:
            state.mark(self.account_id, folder_id, dirty=False, resync=True)
        return folder_id

    def _remember(self, target: str, rows: AccountSyncState) -> None:
        """Leave the job's intent on its row for whoever holds a slot.

        A continuation's work usually shows on its row already (a full round
        under way); when it does not (the rest of an incremental round cut by
        the time budget or a back-off, a folder-list round asked for by a
        folder that was not found), the row is marked too, or dropping the
        continuation would leave that work to the next poll, hours later.
        """
        folder_id = None if target is _LIST else target
        if self.is_continuation:
            row = rows.folder_list if folder_id is None else rows.folders.get(folder_id)
            if row is None or row.dirty or row.resync_requested or row.rounds == 0 \
                    or row.phase != SyncPhase.INCREMENTAL:
                return
        self.e.state.mark(self.account_id, folder_id, dirty=True)

    def _work(self, target: str) -> None:
        self.rows_current = False   # the work writes rows: the next pick needs a fresh read
        if target is _LIST:
            self._sync_folder_list()
        else:
            self._sync_folder(target)

    def _next_pending(self) -> SyncState | None:
        if self.followed:
            return None   # someone is watching: deliver our events now, let others page the rest
        # Rows read after our last write (a first round's end reads them all) are as good as a
        # fresh read for picking the next row: every lease is taken with a conditional write anyway.
        rows = self.rows if self.rows_current and self.rows is not None else self._load()
        ordered = policy.pending_order(_all_rows(rows), self._store_generation(), self.e.clock())
        return ordered[0] if ordered else None

    def _continue_pending(self) -> None:
        """Hand pending rows to a fresh invocation (we may have just freed the slot they wait for).

        When nothing is pending now but a row is backing off (``not_before``
        ahead), the continuation is delayed until then: that row's own
        delayed job may have been consumed by an invocation that could not
        start it, and nothing else would come back for it before the next poll.
        Both wait for the mailbox's hold (a 429) to end.

        Rows leased by another worker are not ours to continue: that worker
        finishes them, or, if it died, the queue redelivers its message and
        the redelivery takes the lease over. (A message that ends on the
        poison queue leaves its lease to expire; the next poll or
        notification then finds the row free.)
        """
        rows = self.rows or self._load()
        wake = policy.next_wake(_all_rows(rows), self._store_generation(), self.e.clock())
        if wake is not None:
            row, delay_s = wake
            self._enqueue_continuation(row.folder_id, reason="pending", delay_s=delay_s)

    def _come_back(self, target: str, delay_s: float, *, reason: str) -> None:
        self._enqueue_continuation(None if target is _LIST else target, reason=reason, delay_s=max(0.0, delay_s))

    def _enqueue_continuation(self, folder_id: str | None, *, reason: str, delay_s: float = 0.0) -> None:
        self.e.queue.enqueue(self.e.continuation(self.account_id, folder_id, reason=reason), delay_s=delay_s)
        self.continued = True

    # --- the folder list ----------------------------------------------------------------

    def _sync_folder_list(self) -> None:
        e = self.e
        try:
            lease = e.state.acquire(self.account_id, None, self.owner, known=self._known(None)) \
                if not self.is_continuation else self._acquire_quietly(None)
        except LeaseLost:
            return
        held: Lease | None = lease
        while held is not None:
            box = [held]
            try:
                held = self._folder_list_round(box)
            except _Stop:
                raise
            except CursorExpired:
                # The folder-list cursor is gone: run a full round right away.
                held = e.state.save(box[0], cursor="", resync_requested=True)
            except (ProviderAuthError, ReauthRequired) as exc:
                self._release_quietly(box[0])
                self._reauth(exc)
                raise _Stop(Outcome.REAUTH) from exc
            except LeaseLost:
                # Someone else runs the folder list now: a redelivery of this message
                # that took us for dead (the host failed to keep it invisible), or our
                # lease lapsed while we were slow. Folder documents carry no version,
                # so our older listing may have landed after its newer one (an old
                # name, a removed folder back). A full round rewrites every folder
                # and drops what is gone; it runs after everything we wrote.
                log.warning("folder list taken over mid-round: a full round follows")
                e.state.mark(self.account_id, None, dirty=True, resync=True)
                return
            except MailsyncError as exc:
                attempt = 0 if policy.retryable(exc) else policy.MAX_QUICK_RETRIES
                log.info("folder list fault, back later: %s", exc.code)
                self._defer(box[0], policy.wait_for(exc, attempt=attempt, failures=box[0].state.failures,
                                                    time_left_s=0.0, rng=e.rng, cap_s=e.backoff_cap_s))
                raise _Stop(Outcome.DEFERRED) from exc
            except BaseException:
                self._release_quietly(box[0])
                raise

    def _folder_list_round(self, box: list[Lease]) -> Lease | None:
        """One round of the folder list; ``box[0]`` always holds the latest lease (for the caller's error path)."""
        e = self.e
        generation = self._store_generation()
        start = box[0].state
        full = policy.needs_full_round(start, generation)
        # A recreated store holds nothing of the account: its sync starts over as an initial one.
        rounds = 0 if policy.store_lost(start, generation) else start.rounds
        if rounds < start.rounds:
            self._store_lost()
        rows = self._load()
        if full:
            box[0] = e.state.save(box[0], cursor="", epoch=policy.next_epoch(start.epoch, e.clock()),
                                  generation=generation, resync_requested=False, rounds=rounds,
                                  first_screen=start.first_screen and start.generation == generation,
                                  phase=SyncPhase.INITIAL if rounds == 0 else SyncPhase.RESYNC)
        cursor = None if full else start.cursor
        seen: set[str] = set()
        created: list[Folder] = []
        while True:
            batch = self._retrying(lambda c=cursor: self._provider_().folder_changes(c))  # type: ignore[misc]
            self._apply_folders(batch.upserts, batch.removals, rows, generation, created)
            if batch.upserts or batch.removals:
                self.changed.add(_LIST)
            seen.update(folder.folder_id for folder in batch.upserts)
            cursor = batch.cursor
            if not box[0].state.first_screen:
                # As soon as the Inbox is known: the page is waiting for it.
                box[0] = self._first_screen(box[0], generation, final=batch.complete)
            if batch.complete:
                break
            if not full:
                # A full round is not resumable (its "seen" set would be lost), and
                # folder lists are a page or two: only incremental rounds save mid-way.
                box[0] = e.state.save(box[0], cursor=cursor)
        if full:
            self._reconcile_folders(seen, rows)
        self._upsert_mailbox(self.account.status)
        finished = e.state.finish(box[0], cursor=cursor, phase=SyncPhase.INCREMENTAL, rounds=rounds + 1,
                                  failures=0)
        after = self._load()
        self._publish_progress(None, SyncPhase.INCREMENTAL.value if rounds else "folders", after)
        if created or full:
            self._fan_out(after)
        if rounds == 0:
            self._maybe_synced(after)   # a mailbox without folders is synced right away
        return finished

    def _apply_folders(self, upserts: Sequence[Folder], removals: Sequence[str], rows: AccountSyncState,
                       generation: str, created: list[Folder]) -> None:
        e = self.e
        new = [f for f in upserts if f.folder_id not in rows.folders]
        known = [f for f in upserts if f.folder_id in rows.folders]
        if new:
            e.store.upsert_folders(new, phase=SyncPhase.INITIAL.value)
        if known:
            e.store.upsert_folders(known)
        now = e.clock()
        e.state.create_many([SyncState(
            account_id=self.account_id, folder_id=folder.folder_id, phase=SyncPhase.INITIAL,
            epoch=policy.next_epoch(0, now), generation=generation, name=folder.name, role=folder.role,
            expected=folder.total_count, parent_id=folder.parent_id, unread=folder.unread_count,
            children=folder.child_folder_count,
        ) for folder in new])
        created.extend(new)
        for folder in known:
            row = rows.folders[folder.folder_id]
            if (row.name, row.role, row.expected, row.parent_id, row.unread, row.children) != (
                    folder.name, folder.role, folder.total_count, folder.parent_id, folder.unread_count,
                    folder.child_folder_count):
                e.state.update_info(self.account_id, folder.folder_id, name=folder.name, role=folder.role,
                                    expected=folder.total_count, parent_id=folder.parent_id,
                                    unread=folder.unread_count, children=folder.child_folder_count)
        for folder_id in self._held(_with_descendants(removals, rows), rows):
            self._remove_folder(folder_id)

    def _held(self, folder_ids: list[str], rows: AccountSyncState) -> list[str]:
        """The removed folders we hold (a row, or a folder document left by a crash between the two).

        Only those have documents to delete. A removal of a folder we never
        synced — a search folder, whose expiry Graph reports like any folder's
        removal although its messages live in other folders — deletes nothing.
        """
        unknown = [fid for fid in folder_ids if fid not in rows.folders]
        if not unknown:
            return folder_ids
        stored = {view.folder.folder_id for view in self.e.store.list_folders(self.account_id)}
        return [fid for fid in folder_ids if fid in rows.folders or fid in stored]

    def _reconcile_folders(self, seen: set[str], rows: AccountSyncState) -> None:
        """After a full folder round: whatever we hold that the provider did not list is gone."""
        gone = set(rows.folders) - seen
        gone.update(view.folder.folder_id for view in self.e.store.list_folders(self.account_id)
                    if view.folder.folder_id not in seen)
        for folder_id in sorted(gone):
            self._remove_folder(folder_id)

    def _remove_folder(self, folder_id: str) -> None:
        # Row first: a worker paging the folder then fails its next save and
        # cleans up after itself (see _sync_folder), so no page it writes survives.
        self.e.state.delete(self.account_id, folder_id)
        self.e.store.remove_folder(self.account_id, folder_id)
        log.info("folder removed", extra={"removed_folder": folder_id})

    def _first_screen(self, lease: Lease, generation: str, *, final: bool) -> Lease:
        """The newest Inbox messages, once per account (and after the store was recreated).

        Called after each folder-list batch until it happened; ``final``
        (the round's last batch) marks it done even for a mailbox without an Inbox.
        """
        e = self.e
        if lease.state.first_screen:
            return lease
        rows = self._load()
        inbox = next((row for row in rows.folders.values() if row.role == "inbox"), None)
        if inbox is None and not final:
            return lease
        if inbox is not None and inbox.folder_id is not None:
            folder_id = inbox.folder_id
            inbox_lease = self._acquire_quietly(folder_id)
            if inbox_lease is not None:
                try:
                    state = inbox_lease.state
                    if not state.cursor or state.generation != generation:
                        messages = tuple(self._retrying(
                            lambda: self._provider_().newest_messages(folder_id, e.settings.first_screen_messages)))
                        # The Inbox's current epoch: its first full round runs one
                        # epoch later, so it rewrites these or removes them as stale.
                        written = e.store.upsert_messages(messages, epoch=state.epoch)
                        e.store.refresh()
                        self.upserted += len(messages)
                        shown = _kept(messages, written.stale_ids)
                        if shown:
                            self.events.publish_changes(MessagesChanged(self.account_id, upserted=tuple(shown)))
                        self.end_now = True
                finally:
                    self._release_quietly(inbox_lease)
        return e.state.save(lease, first_screen=True)

    def _fan_out(self, rows: AccountSyncState) -> None:
        """Start the pending folders (Inbox first), one job per mailbox slot; this invocation ends."""
        ordered = [r for r in policy.pending_order(_all_rows(rows), self._store_generation(), self.e.clock())
                   if r.folder_id is not None]
        for row in ordered[: self.e.settings.graph_max_concurrency]:
            self._enqueue_continuation(row.folder_id, reason="start")
        if ordered:
            self.end_now = True

    # --- one folder --------------------------------------------------------------------

    def _sync_folder(self, folder_id: str) -> None:
        e = self.e
        try:
            if self.pretaken is not None and self.pretaken.state.folder_id == folder_id:
                lease: Lease | None = self.pretaken
                self.pretaken = None
            elif not self.is_continuation:
                # Only the job's own folder comes with news; a pending one picked up on the way does not.
                lease = e.state.acquire(self.account_id, folder_id, self.owner, known=self._known(folder_id),
                                        news=folder_id == self.job.folder_id)
            else:
                lease = self._acquire_quietly(folder_id)
        except LeaseLost:
            # Unknown or just deleted: let the folder list decide.
            self._enqueue_continuation(None, reason="unknown_folder")
            return
        if lease is None:
            return
        held: Lease | None = lease
        # The folder's first round is a bulk load: the store may refresh less often meanwhile
        # (a 3-5x cheaper index on a real engine); every way out of here ends it.
        loading = lease.state.rounds == 0 and self._bulk_load(folder_id, begin=True)
        try:
            while held is not None:
                held = self._folder_round(held)
        except LeaseLost as lost:
            if lost.code == "folder_gone":
                # The folder was deleted while we paged it: undo whatever we wrote.
                e.store.remove_folder(self.account_id, folder_id)
            log.info("lease lost: %s", lost.message)
        except _Stop:
            raise
        except BaseException:
            self._release_quietly(held)
            raise
        finally:
            if loading:
                self._bulk_load(folder_id, begin=False)

    def _bulk_load(self, folder_id: str, *, begin: bool) -> bool:
        """Begin or end the store's bulk load for this folder; True if that worked.

        Only speed depends on it, never correctness, so a store fault here is
        logged and the sync goes on: a begin that failed leaves the normal
        refresh, an end that failed leaves a lease that expires (and the poll
        tick's ``expire_bulk_loads`` restores the refresh).
        """
        store = self.e.store
        try:
            if begin:
                store.begin_bulk_load(self.account_id, folder_id)
            else:
                store.end_bulk_load(self.account_id, folder_id)
        except MailsyncError as exc:
            log.warning("bulk load %s failed: %s", "begin" if begin else "end", exc.code,
                        extra={"error": exc.message})
            return False
        return True

    def _folder_round(self, lease: Lease) -> Lease | None:
        """Page one round of a folder; returns the lease if another round must follow, else None."""
        folder_id = lease.state.folder_id
        assert folder_id is not None
        generation = self._store_generation()
        if policy.needs_full_round(lease.state, generation):
            lease = self._start_full_round(lease, generation)
        elif lease.state.cursor and lease.state.phase != SyncPhase.INCREMENTAL:
            # bench/initial_sync.py counts these: a large folder's first round over several invocations.
            log.info("full round resumes", extra={"phase": lease.state.phase.value})
        resyncs = 0
        while True:
            outcome = self._page_round(lease)
            if isinstance(outcome, _Deferred):
                raise _Stop(Outcome.DEFERRED)
            if isinstance(outcome, _OutOfTime):
                return None
            if isinstance(outcome, _Resync):
                resyncs += 1
                if resyncs > 2:
                    # 410 again on a fresh start: wait rather than spin.
                    self._defer(outcome.lease, policy.Wait(30.0, False, False, "cursor_expired"))
                    raise _Stop(Outcome.DEFERRED)
                lease = self._start_full_round(outcome.lease, generation)
                continue
            lease = outcome.lease
            if lease.state.resync_requested:
                lease = self._start_full_round(lease, generation)
                continue
            return self._complete_round(lease, outcome.fields)

    def _complete_round(self, lease: Lease, fields: dict[str, Any]) -> Lease | None:
        """The round reached its end: drop what a full round did not see, then save the final cursor."""
        e = self.e
        state = lease.state
        folder_id = state.folder_id
        assert folder_id is not None
        was_full = state.phase != SyncPhase.INCREMENTAL
        try:
            if was_full:
                removed = e.store.remove_stale(self.account_id, folder_id, state.epoch)
                if removed:
                    log.info("removed %d stale message(s)", removed)
            final = {**fields, "phase": SyncPhase.INCREMENTAL, "rounds": state.rounds + 1, "failures": 0}
            if self.one_round and self.slot is not None:
                # The round is this invocation's last Graph work: the slot goes back with the lease.
                finished, slot_back = e.state.finish_and_release_slot(lease, self.slot, **final)
                if slot_back:
                    self.slot = None
            else:
                finished = e.state.finish(lease, **final)
        except MailsyncError as exc:
            if isinstance(exc, LeaseLost) or not policy.retryable(exc):
                raise
            # The final cursor is not saved: the continuation re-reads the last page.
            self._defer(lease, policy.wait_for(exc, attempt=policy.MAX_QUICK_RETRIES, failures=state.failures,
                                               time_left_s=0.0, rng=e.rng, cap_s=e.backoff_cap_s))
            raise _Stop(Outcome.DEFERRED) from exc
        done = replace(state, phase=SyncPhase.INCREMENTAL, rounds=state.rounds + 1)
        if was_full:
            self._publish_folder_phase(done, SyncPhase.INCREMENTAL)
        if state.rounds == 0:
            rows = self._load()   # whether this was the account's last initial round: everyone's rows
            self.rows_current = finished is None   # released: nothing of ours is written after this read
            self._publish_progress(folder_id, SyncPhase.INCREMENTAL.value, rows)
            self._maybe_synced(rows)
        else:
            # Steady state: progress only needs this folder's new state; no table read for it.
            self._publish_progress(folder_id, SyncPhase.INCREMENTAL.value, None, live=done)
        return finished

    def _start_full_round(self, lease: Lease, generation: str) -> Lease:
        state = lease.state
        lost = policy.store_lost(state, generation)
        rounds = 0 if lost else state.rounds
        if lost and state.rounds:
            self._store_lost()
        phase = SyncPhase.INITIAL if rounds == 0 else SyncPhase.RESYNC
        log.info("full round starts", extra={"phase": phase.value, "reason": _full_reason(state, generation)})
        return self.e.state.save(lease, cursor="", phase=phase, epoch=policy.next_epoch(state.epoch, self.e.clock()),
                                 generation=generation, resync_requested=False, indexed=0, removed=0,
                                 rounds=rounds, round_started=self.e.clock())

    def _page_round(self, lease: Lease) -> _RoundDone | _Deferred | _Resync | _OutOfTime:
        """Pages until the round completes, time runs out, or a fault."""
        e = self.e
        folder_id = lease.state.folder_id
        assert folder_id is not None
        attempt = 0
        while True:
            cursor = lease.state.cursor or None
            reader = PageReader(functools.partial(self._provider_().message_changes, folder_id), cursor,
                                depth=READ_AHEAD_PAGES, deadline=self.deadline, clock=e.clock,
                                window=e.settings.delta_links_kept - 1)
            try:
                while True:
                    # Out of time: write what was read (never drop it and read it again, which
                    # would issue newer links than the saved one), then stop with the newest link.
                    out_of_time = self._time_left() <= 0
                    pages = reader.drain() if out_of_time else reader.take(MAX_BULK_MESSAGES)
                    if pages:
                        lease, final = self._write_pages(lease, pages)
                        reader.saved(len(pages))
                        attempt = 0
                        if final is not None:
                            return _RoundDone(lease, final)
                        if lease.state.resync_requested:
                            return _RoundDone(lease, {})
                    if out_of_time or not pages:
                        e.state.release(lease)
                        self._enqueue_continuation(folder_id, reason="time_budget")
                        self.end_now = True
                        return _OutOfTime()
            except CursorExpired:
                log.info("cursor expired: resync")
                return _Resync(lease)
            except (ProviderAuthError, ReauthRequired) as exc:
                self._release_quietly(lease)
                self._reauth(exc)
                raise _Stop(Outcome.REAUTH) from exc
            except NotFound:
                # The folder is gone at the provider (or never was): the folder list decides.
                delay = policy.backoff_seconds(lease.state.failures, e.rng, cap_s=e.backoff_cap_s)
                wait = policy.Wait(delay, False, False, "not_found")
                self._defer(lease, wait, requeue=False)
                self._enqueue_continuation(None, reason="folder_not_found")
                return _Deferred()
            except MailsyncError as exc:
                if isinstance(exc, LeaseLost):
                    raise
                if not policy.retryable(exc):
                    log.warning("folder failed: %s", exc.code, extra={"error": exc.message})
                    return self._defer(lease, policy.wait_for(exc, attempt=policy.MAX_QUICK_RETRIES,
                                                               failures=lease.state.failures,
                                                               time_left_s=0.0, rng=e.rng, cap_s=e.backoff_cap_s))
                wait = policy.wait_for(exc, attempt=attempt, failures=lease.state.failures,
                                       time_left_s=self._time_left(), rng=e.rng, cap_s=e.backoff_cap_s)
                if not wait.in_place:
                    log.info("transient fault, back later: %s", exc.code, extra={"wait_s": round(wait.seconds, 2)})
                    return self._defer(lease, wait)
                attempt += 1
                e.sleep(wait.seconds)
            finally:
                reader.close()

    def _write_pages(self, lease: Lease, pages: list[MessageBatch]) -> tuple[Lease, dict[str, Any] | None]:
        """``_apply_pages`` with short store faults retried in place: the pages were read, and reading
        them again would issue newer delta links than the one saved (see pipeline.py)."""
        return self._retrying(lambda: self._apply_pages(lease, pages))

    def _apply_pages(self, lease: Lease, pages: list[MessageBatch]) -> tuple[Lease, dict[str, Any] | None]:
        """Write the pages' changes (last one wins per id), then save the last page's cursor.

        On the round's last page the cursor and counts are *returned* instead
        of saved: ``_complete_round`` saves them after ``remove_stale``, or a
        crash in between would leave the folder "complete" with stale documents.
        """
        e = self.e
        state = lease.state
        folder_id = state.folder_id
        assert folder_id is not None
        changes: dict[str, Message | None] = {}
        for page in pages:
            for message in page.upserts:
                changes[message.message_id] = message
            for message_id in page.removals:
                changes[message_id] = None
        upserts = [m for m in changes.values() if m is not None]
        removals = [mid for mid, m in changes.items() if m is None]
        if self.expected is not None and folder_id == self.job.folder_id:
            for page in pages:   # in stream order: the last word on an id wins
                for message in page.upserts:
                    self.seen[message.message_id] = page.versions.get(message.message_id, "")
                for message_id in page.removals:
                    self.seen[message_id] = None
        if e.before_write is not None:
            e.before_write(folder_id, self.pages)
        shown = upserts
        if upserts:
            result = e.store.upsert_messages(upserts, epoch=state.epoch)
            if result.failed_ids:
                log.warning("%d message(s) dead-lettered by the store", len(result.failed_ids))
            shown = _kept(upserts, result.stale_ids)
        if removals:
            e.store.remove_messages(self.account_id, folder_id, removals)
        self.pages += len(pages)
        self.upserted += len(upserts)
        self.removed_count += len(removals)
        full = state.phase != SyncPhase.INCREMENTAL
        last = pages[-1]
        fields: dict[str, Any] = {"cursor": last.cursor, "failures": 0}
        if full:
            fields["indexed"] = state.indexed + len(upserts)
        else:
            fields["removed"] = state.removed + len(removals)
        final: dict[str, Any] | None = None
        if last.complete:
            final = fields
            live = replace(state, **{k: v for k, v in fields.items() if k != "cursor"})
        else:
            lease = e.state.save(lease, **fields)
            live = lease.state
        if upserts or removals:
            self.changed.add(folder_id)
            self.events.publish_changes(MessagesChanged(
                self.account_id, upserted=tuple(shown), removed=tuple((folder_id, mid) for mid in removals)))
            if not full:
                self.followed = True
        self._publish_progress(folder_id, state.phase.value, None, live=live)
        return lease, final

    def _defer(self, lease: Lease, wait: policy.Wait, *, requeue: bool = True) -> _Deferred:
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
            return _Deferred()
        if requeue and failures < policy.MAX_FAILURES:
            self._enqueue_continuation(lease.state.folder_id, reason=wait.reason, delay_s=wait.seconds)
        elif requeue:
            log.error("folder keeps failing; parked until the next change or poll",
                      extra={"failures": failures, "reason": wait.reason})
        self.end_now = True
        return _Deferred()

    def _retrying(self, call: Callable[[], _T]) -> _T:
        """A provider call, with short transient waits slept in place; other faults propagate."""
        attempt = 0
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
        e = self.e
        for _ in range(3):
            account = e.accounts.get(self.account_id)
            if account is None or account.status != AccountStatus.SYNCING:
                return
            try:
                self.account = e.accounts.save(replace(account, status=AccountStatus.SYNCED,
                                                       updated_at=datetime.now(UTC), error=None))
            except Conflict:
                continue
            log.info("account synced", extra={"elapsed_s": round(e.clock() - self.started, 3)})
            self._upsert_mailbox(AccountStatus.SYNCED)
            self._publish_progress(None, "synced", rows)
            return

    def _store_lost(self) -> None:
        """The store was recreated under a synced account: it is ``syncing`` again until every folder is back.

        Its list is empty meanwhile, so ``synced`` would be a lie; ``_maybe_synced``
        sets it back once every row has completed a round in the new generation.
        """
        e = self.e
        for _ in range(3):
            account = e.accounts.get(self.account_id)
            if account is None or account.status != AccountStatus.SYNCED:
                return
            try:
                self.account = e.accounts.save(replace(account, status=AccountStatus.SYNCING,
                                                       updated_at=datetime.now(UTC)))
            except Conflict:
                continue
            log.warning("the store was recreated: the account is syncing again")
            return

    def _reauth(self, error: MailsyncError) -> None:
        e = self.e
        log.warning("account needs to sign in again (%s)", error.code)
        for _ in range(3):
            account = e.accounts.get(self.account_id)
            if account is None or account.status == AccountStatus.REAUTH_REQUIRED:
                break
            try:
                message = REAUTH_MESSAGES[account.provider]
                self.account = e.accounts.save(replace(account, status=AccountStatus.REAUTH_REQUIRED,
                                                       error=message, updated_at=datetime.now(UTC)))
                break
            except Conflict:
                continue
        self._upsert_mailbox(AccountStatus.REAUTH_REQUIRED)
        self._publish_progress(None, AccountStatus.REAUTH_REQUIRED.value, self._load())

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


_LIST = "\x00folder-list"   # sentinel target: the folder list (never a provider folder id)


@dataclass(frozen=True)
class _Deferred:
    """The folder was given back; a continuation (maybe delayed) is on the queue."""


@dataclass(frozen=True)
class _Resync:
    lease: Lease


@dataclass(frozen=True)
class _RoundDone:
    lease: Lease
    fields: dict[str, Any] = field(default_factory=dict)   # final cursor + counts, saved by finish


@dataclass(frozen=True)
class _OutOfTime:
    """The invocation's budget is spent; the folder was released with its progress."""


def _all_rows(rows: AccountSyncState) -> list[SyncState]:
    found = list(rows.folders.values())
    if rows.folder_list is not None:
        found.insert(0, rows.folder_list)
    return found


def _with_descendants(folder_ids: Sequence[str], rows: AccountSyncState) -> list[str]:
    """The removed folders plus the subfolders we know under them (a provider may report only the top)."""
    children: dict[str, list[str]] = {}
    for fid, row in rows.folders.items():
        if row.parent_id:
            children.setdefault(row.parent_id, []).append(fid)
    found: list[str] = []
    todo = list(folder_ids)
    while todo:
        fid = todo.pop()
        if fid in found:
            continue
        found.append(fid)
        todo.extend(children.get(fid, ()))
    return found


def _full_reason(state: SyncState, generation: str) -> str:
    if state.resync_requested:
        return "requested"
    if state.generation and state.generation != generation:
        return "store_generation"
    return "initial" if state.rounds == 0 else "cursor_lost"



def _kept(messages: Sequence[Message], stale_ids: Sequence[str]) -> list[Message]:
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
