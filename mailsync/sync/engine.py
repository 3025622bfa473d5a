"""The sync engine: makes the store equal to the mailbox, and keeps it so.

How it works
============

Work arrives as queue jobs that only *name* an account (and maybe a
folder); all state lives in the sync table (``mailsync.storage.sync_table``):
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

The lease and ``dirty`` (see mailsync/storage/folder_leases.py for the protocol): one worker at a
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

Where the code is: this module takes the job and runs the invocation's
flow above (which target, pending rows while time is left, the look-agains
after a notified round, the continuation); ``mailsync.sync.folder_list``
runs the folder list's rounds, ``mailsync.sync.folder_rounds`` a folder's;
``mailsync.sync.invocation`` holds what they share (the invocation's
state, the account's status and progress events, waits and continuations).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from mailsync.jobs import EVERY_FOLDER, NOTIFIED_AT, STAND_IN_SWEEPS, TAKE_PENDING, JobKind, JobOutbox, new_job
from mailsync.logs import log_context
from mailsync.models import Account, AccountStatus, Job, SyncPhase
from mailsync.ports import AccountRepository, EventPublisher, JobQueue, MessageStore, ProviderFactory
from mailsync.settings import Settings
from mailsync.storage.sync_rows import AccountSyncState, Lease, SyncState, delivery_of
from mailsync.storage.sync_table import SyncStateTable
from mailsync.sync import policy
from mailsync.sync.folder_list import FolderListSync
from mailsync.sync.folder_rounds import FolderSync
from mailsync.sync.invocation import (
    CONTINUATION,
    FOLDER_LIST,
    NOTIFIED_REASONS,
    RELOOK,
    RELOOK_COVERED,
    Delivery,
    Outcome,
    StopInvocation,
    all_rows,
    relook_attempt,
)
from mailsync.sync.quiet_sweep import QuietSweep

log = logging.getLogger("mailsync.sync")

ACTIVE_STATUSES = (AccountStatus.SYNCING, AccountStatus.SYNCED)
__all__ = ["Delivery", "Outcome", "SyncEngine"]


class RecentReads(Protocol):
    """Accounts this process read moments ago (``mailsync.monitoring.recent_accounts.RecentAccounts``)."""

    def get(self, account_id: str, *, linked: bool) -> Account | None:
        """The account; a recent read of it when ``linked`` (the caller's read shows its sync rows)."""
        ...


class LagObserver(Protocol):
    """Learns delta's lag from notified rounds (``mailsync.monitoring.delta_lag.DeltaLag``)."""

    def observe(self, age_s: float, read_them: bool) -> None:
        """A notified round read delta ``age_s`` after its newest notification; ``read_them``: it read
        the versions they announced."""
        ...


class SyncEngine:
    """Runs sync jobs. One instance per process; ``handle`` is thread-safe."""

    def __init__(self, settings: Settings, *, accounts: AccountRepository, providers: ProviderFactory,
                 store: MessageStore, state: SyncStateTable, queue: JobQueue,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, backoff_cap_s: float = policy.BACKOFF_CAP_S,
                 recent: RecentReads | None = None, lag: LagObserver | None = None) -> None:
        """``recent``: a notified round or look-again queued on its own reads its rows first and, when they
        show the account linked, reuses this process's read of the account of moments ago (the NOTIFIED
        job's, 2 s before a look-again); None reads the account for every job. ``lag``: told, after each
        notified round that knew what it must read, whether it read it and how long after its
        notifications (the NOTIFIED job's delay is learnt from it)."""
        self.settings = settings
        self.accounts = accounts
        self.recent = recent
        self.lag = lag
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
               account: Account | None = None, rows: AccountSyncState | None = None,
               wake: JobOutbox | None = None) -> Outcome:
        """Run one sync job (SYNC_FOLDERS, SYNC_FOLDER, RESYNC_FOLDER, RESYNC_ACCOUNT); see ``run_in_place``.

        ``wake``: the invocation's queue output binding on the sync queue; a job the run enqueues to run
        now also puts a WAKE there (``InvocationBase.queue``).
        """
        return self._handle(job, delivery, events, account, rows, wake)[0]

    def run_in_place(self, job: Job, delivery: Delivery, events: EventPublisher, *, account: Account | None,
                     rows: AccountSyncState | None = None) -> AccountSyncState | None:
        """``handle`` for a monitoring job running sync jobs in its own invocation (a NOTIFIED job's rounds
        one after the other, a new account's initial sync after its subscriptions): returns the rows this run
        ended with, for the next round to start from (None: it should read them). They were read, or
        known (``_rows_known_at_end``), after the run's last write of the rows its next round takes;
        every write from them is ETag-conditional, so a row changed since costs a re-read, never a wrong write.
        """
        outcome, run = self._handle(job, delivery, events, account, rows)
        if run is None or outcome != Outcome.DONE or run.rows is None or run.rows.account_id != job.account_id:
            return None
        return run.rows

    def _handle(self, job: Job, delivery: Delivery, events: EventPublisher, account: Account | None,
                rows: AccountSyncState | None,
                wake: JobOutbox | None = None) -> tuple[Outcome, _Invocation | None]:
        """Run one sync job and return its outcome and run (None when dropped before it began).

        ``account``: the account as the caller has just read it (a NOTIFIED job
        running the job in its own invocation); else it is read here. ``rows``:
        the account's sync rows as the caller has just read them (the NOTIFIED
        job's read of its pending row), used instead of the invocation's first
        read; every write from them is ETag-conditional, so rows changed since
        cost a re-read, never a wrong write.
        """
        with log_context(account_id=job.account_id, job_id=job.job_id, folder_id=job.folder_id):
            if account is None or account.account_id != job.account_id:
                if self.recent is not None and rows is None and job.kind == JobKind.SYNC_FOLDER \
                        and job.reason in NOTIFIED_REASONS:
                    # Its rows, read first (the run's own first read), show the account still linked
                    # (an unlink deletes them before the account row): a read of moments ago will do.
                    rows = self.state.load(job.account_id)
                    account = self.recent.get(job.account_id, linked=rows.folder_list is not None)
                else:
                    account = self.accounts.get(job.account_id)
            if account is None:
                # Unlinked meanwhile: its documents are gone; drop its sync rows too.
                self.state.delete_account(job.account_id)
                log.info("job for an unknown account dropped", extra={"kind": job.kind})
                return Outcome.DROPPED, None
            if account.status not in ACTIVE_STATUSES:
                log.info("job dropped: account is %s", account.status.value, extra={"kind": job.kind})
                return Outcome.DROPPED, None
            run = _Invocation(self, account, job, delivery, events, wake)
            outcome = run.run(rows if rows is not None and rows.account_id == account.account_id else None)
            log.info("sync job %s", outcome.value, extra={
                "kind": job.kind, "pages": run.pages, "upserted": run.upserted, "removed": run.removed_count,
                "elapsed_s": round(self.clock() - run.started, 3)})
            return outcome, run

    def continuation(self, account_id: str, folder_id: str | None, *, reason: str) -> Job:
        kind = JobKind.SYNC_FOLDERS if folder_id is None else JobKind.SYNC_FOLDER
        return new_job(kind, account_id, folder_id, reason=reason, attrs={CONTINUATION: "1"})


class _Invocation(FolderSync, FolderListSync, QuietSweep):
    """One job's run: which target, then pending rows while time is left, then what comes after."""

    def run(self, preloaded: AccountSyncState | None = None) -> Outcome:
        e = self.e
        if preloaded is not None:
            self.rows = rows = preloaded
        else:
            rows = self._load()
        if rows.folder_list is None:
            made = e.state.insert(SyncState(account_id=self.account_id, folder_id=None, phase=SyncPhase.INITIAL,
                                            epoch=policy.next_epoch(0, e.clock())))
            # Ours: the rows just read, with it, are the account's (folder rows come from its rounds
            # only). Someone else's: read what they did since.
            rows = self.rows = replace(rows, folder_list=made) if made is not None else self._load()
        target = self._target(rows)
        assert rows.folder_list is not None
        # A NOTIFIED job's first round may take the job's notifications (the pending row) with its
        # slot and lease; when it cannot, it takes them on its own before anything else: they must be
        # taken before the mailbox is read (mailsync.monitoring.handler). PendingChanged propagates.
        pending_etag = self.job.attrs.get(TAKE_PENDING) or None
        taken = e.state.take_slot_and_lease(rows, target, self.owner, e.settings.graph_max_concurrency,
                                            news=target == self.job.folder_id, take_pending=pending_etag) \
            if self._takes_both(rows, target) else None
        if taken is None and pending_etag is not None:
            e.state.take_pending(self.account_id, pending_etag)
        if taken is not None:
            slot, self.pretaken = taken
            self.took_from = rows
        else:
            found = e.state.acquire_slot(self.account_id, self.owner, e.settings.graph_max_concurrency, known=rows)
            if found is None:
                self._remember(target, rows, waiting=True)
                # A holder may have left between our two looks: one signalled with our mark reads
                # the rows after giving its slot back, we re-check slots after marking
                # (SyncStateTable.mark_waiting).
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
                if self.sweeping and not self.end_now:
                    self._rest_quiet_folders()   # the marked folders with nothing new, without their rounds
            while outcome == Outcome.DONE and not self.end_now and not self.one_round \
                    and self._time_left() > 0.2 * e.settings.sync_time_budget_s:
                pending = self._next_pending()
                if pending is None:
                    break
                self._work(pending.folder_id if pending.folder_id is not None else FOLDER_LIST)
        except StopInvocation as stop:
            outcome = stop.outcome
        finally:
            if self.pretaken is not None:      # taken with the slot, never used (held mailbox, a failure)
                self._release_quietly(self.pretaken)
            self._close_provider()
            if self.slot is not None:          # not given back with the round's finish
                e.state.release_slot(self.slot)
        wrote = bool(self.upserted or self.removed_count)
        known = self._rows_known_at_end(outcome)
        if known is not None:
            rows = self.rows = known
        elif outcome != Outcome.REAUTH or wrote:
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

    def _rows_known_at_end(self, outcome: Outcome) -> AccountSyncState | None:
        """The rows a notified round's invocation ends from without reading them again, or None: read them.

        The end's read serves three things: slots' waiters (a job that found
        every slot busy marked its row for whoever holds one), the last
        initial round's ``synced`` check, and the unlink check. A one-round
        invocation whose slot and lease were taken together from the rows it
        had read (``took_from``) and given back together, unsignalled
        (``released``), knows every waiter's mark from that read
        (``SyncStateTable.mark_waiting``): the rows it read, with its folder
        and slot as its finish left them, are as good for what is pending
        (and for the next round of the same NOTIFIED job to start from). A ``syncing``
        account still reads (whether the account is ``synced`` now needs
        everyone's rows). An unlink shows in the finish (its transaction is
        refused on the deleted row: ``LeaseLost``, the pages written are
        removed, and this path reads); one whose row deletion comes after the
        finish is not seen, as one after the end's read never was.
        """
        released = self.released
        if outcome != Outcome.DONE or not self.one_round or self.took_from is None or released is None \
                or released.row.folder_id is None or self.account.status != AccountStatus.SYNCED:
            return None
        if self.rows_current and self.rows is not None:
            return self.rows        # read after the finish already (a first round's end)
        taken = self.took_from
        slots = (*(slot for slot in taken.slots if slot.index != released.slot.index), released.slot)
        return replace(taken, folders={**taken.folders, released.row.folder_id: released.row}, slots=slots,
                       slots_busy=sum(1 for slot in slots if slot.owner and slot.until > self.e.clock()))

    def _takes_both(self, rows: AccountSyncState, target: str) -> bool:
        """Whether to take the slot and the target's lease together (``SyncStateTable.take_slot_and_lease``):
        a one-round invocation whose mailbox is not held back and that has no dead
        delivery's leases to reclaim first (those paths need the slot alone)."""
        if not self.one_round or target is FOLDER_LIST or rows.folder_list is None \
                or rows.folder_list.not_before > self.e.clock():
            return False
        mine = delivery_of(self.owner)
        return not any(row.lease_owner and delivery_of(row.lease_owner) == mine for row in all_rows(rows))

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
            target, folder_id = FOLDER_LIST, None    # a folder subscription's notification: names, parents, new folders
        else:
            return
        attempt = relook_attempt(job)
        delay = self._relook_delay(target)
        self._report_lag(outcome, attempt)
        if delay is None:
            if not attempt and self.expected is not None and self.expected.met_by(self.seen):
                # The round read the very versions its notifications announced (or their removal):
                # nothing they name is still inside delta's lag.
                log.info("notified round read the notified versions: no look-again")
            return
        e = self.e
        claimed = self.relook_claim if outcome == Outcome.DONE else None
        if claimed == RELOOK_COVERED:
            return
        if claimed is not None:
            delay = max(0.0, claimed - e.clock())   # claimed with the round's finish (_complete_round)
        # self.rows: read at the end of the run, after our last write (the claim is ETag-checked anyway).
        elif not e.state.schedule_relook(self.account_id, folder_id, at=e.clock() + delay,
                                         known=self._known(folder_id)):
            return
        notified_at = job.attrs.get(NOTIFIED_AT)
        extra = {"delay_s": delay, "attempt": attempt + 1}
        if notified_at and not attempt:
            # Why a look-again was needed: how long after its notification the round read delta, and what it
            # read of what it was told to (a version it missed, or none at all).
            with contextlib.suppress(ValueError):
                extra["age_s"] = round(self.started - float(notified_at), 3)
            if self.expected is not None:
                extra["missed"] = sum(1 for mid, tag in self.expected.versions.items() if self.seen.get(mid) != tag) \
                    + sum(1 for mid in self.expected.removed if mid not in self.seen)
                extra["other_version"] = sum(1 for mid, tag in self.expected.versions.items()
                                             if self.seen.get(mid) not in (None, tag))
        log.info("notified round: looking again", extra=extra)
        e.queue.enqueue(new_job(JobKind(job.kind), self.account_id, folder_id, reason=RELOOK,
                                attrs={RELOOK: str(attempt + 1)}), delay_s=delay)

    def _report_lag(self, outcome: Outcome, attempt: int) -> None:
        """Tell the engine's lag observer how this notified round fared against delta's lag."""
        notified_at = self.job.attrs.get(NOTIFIED_AT)
        if self.e.lag is None or outcome != Outcome.DONE or attempt or self.expected is None or not notified_at \
                or not self.rounds_done:
            return     # no round of its own (the folder was leased elsewhere): it says nothing of the lag
        try:
            age = self.started - float(notified_at)
        except ValueError:
            return
        self.e.lag.observe(age, self.expected.met_by(self.seen))

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
        if job.reason in STAND_IN_SWEEPS and self.first_sweep:
            # The account's initial sync was the sweep (a new account's subscriptions come first:
            # mailsync.monitoring.handler): every first round read the mailbox after the subscription
            # existed, so what it can have missed is a change made before it that delta did not show yet.
            # The last look-again alone covers the same lag the two do (it comes at least the longest
            # delay after every such read); the earlier one only shows such a change sooner, and the
            # account is not synced yet. One folder-list round and one delta read per folder, not two.
            attempt = len(policy.RELOOK_DELAYS_S) - 1
        elif job.reason in STAND_IN_SWEEPS:
            attempt = 0
        elif job.reason == RELOOK:
            attempt = relook_attempt(job)
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
        for row in all_rows(rows):
            if row.lease_owner and delivery_of(row.lease_owner) == mine:
                log.info("reclaiming a lease from a dead delivery", extra={"reclaimed_folder": row.folder_id})
                self._release_quietly(Lease(row, row.lease_owner))

    def _target(self, rows: AccountSyncState) -> str:
        kind, folder_id = self.job.kind, self.job.folder_id
        state = self.e.state
        if kind == JobKind.RESYNC_ACCOUNT:
            state.mark_many(self.account_id, [*rows.folders, None], dirty=False, resync=True)
            return FOLDER_LIST
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
            self.sweeping = bool(started)
            # Nothing of the mailbox read yet, nor being read: this sweep's rounds are the account's first.
            self.first_sweep = not rows.folders and rows.folder_list is not None \
                and rows.folder_list.rounds == 0 and not rows.folder_list.leased(now)
            return FOLDER_LIST
        if folder_id is None or kind == JobKind.SYNC_FOLDERS:
            return FOLDER_LIST
        if folder_id not in rows.folders:
            # Not in our folder list (yet): the folder list round creates it, or finds it gone.
            return FOLDER_LIST
        if kind == JobKind.RESYNC_FOLDER:
            state.mark(self.account_id, folder_id, dirty=False, resync=True)
        return folder_id

    def _remember(self, target: str, rows: AccountSyncState, *, waiting: bool = False) -> None:
        """Leave the job's intent on its row for whoever holds a slot.

        A continuation's work usually shows on its row already (a full round
        under way); when it does not (the rest of an incremental round cut by
        the time budget or a back-off, a folder-list round asked for by a
        folder that was not found), the row is marked too, or dropping the
        continuation would leave that work to the next poll, hours later.
        ``waiting``: every slot is busy; the mark goes with a signal to their
        holders (``SyncStateTable.mark_waiting``), even when the row needs none.
        """
        folder_id = None if target is FOLDER_LIST else target
        mark = True
        if self.is_continuation:
            row = rows.folder_list if folder_id is None else rows.folders.get(folder_id)
            mark = not (row is None or row.dirty or row.resync_requested or row.rounds == 0
                        or row.phase != SyncPhase.INCREMENTAL)
        if waiting:
            self.e.state.mark_waiting(self.account_id, folder_id, dirty=mark,
                                      max_slots=self.e.settings.graph_max_concurrency)
        elif mark:
            self.e.state.mark(self.account_id, folder_id, dirty=True)

    def _work(self, target: str) -> None:
        self.rows_current = False   # the work writes rows: the next pick needs a fresh read
        if target is FOLDER_LIST:
            self._sync_folder_list()
        else:
            self._sync_folder(target)

    def _next_pending(self) -> SyncState | None:
        if self.followed:
            return None   # someone is watching: deliver our events now, let others page the rest
        # Rows read after our last write (a first round's end reads them all) are as good as a
        # fresh read for picking the next row: every lease is taken with a conditional write anyway.
        rows = self.rows if self.rows_current and self.rows is not None else self._load()
        ordered = policy.pending_order(all_rows(rows), self._store_generation(), self.e.clock())
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
        wake = policy.next_wake(all_rows(rows), self._store_generation(), self.e.clock())
        if wake is not None:
            row, delay_s = wake
            self._enqueue_continuation(row.folder_id, reason="pending", delay_s=delay_s)
