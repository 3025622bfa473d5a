"""Queue jobs of change monitoring, run by the sync worker.

NOTIFIED — turn an account's pending notifications into SYNC_FOLDER jobs.
A message subscription on ``me/messages`` says "message X changed" with no
folder, but the engine syncs per folder. Resolution, cheapest first:

1. ``updated`` / ``deleted`` ids the store already holds: the store knows
   their folder (one multi-get of the row's ids from the store; no Graph call).
2. ``created`` ids (new mail, or the target half of a move — with immutable
   ids a moved message keeps its id, so the store still names the *source*
   folder, which needs syncing too) and ids the store does not hold yet: the
   folder their rich notification carried (``parentFolderId``, decrypted by
   the webhook: ``mailsync.monitoring.resource_data``), else one Graph
   ``GET messages/{id}?$select=parentFolderId`` each.
3. When there are more ids to look up than the account has folders, or the
   lookups fail (throttled, down), or the pending row overflowed: sync every
   folder. Each folder costs one delta request that returns nothing when
   nothing changed, so past that point per-message lookups cost more.

A resolved folder we have no sync row for yet (a new folder) also gets a
SYNC_FOLDERS job, which starts it; so does a pending row marked
with ``folder_notices`` by the account's ``me/mailFolders`` subscription (a
folder created, renamed, moved or deleted). Extra jobs are harmless: the engine's
folder lease turns a job for a busy folder into a "dirty" mark and one more
round.

No queue hop when it is small: when the worker passes a ``direct`` runner
(the engine, in the same invocation) and the notifications resolve to at
most ``DIRECT_MAX_JOBS`` sync jobs, the NOTIFIED job runs them itself, one
after the other, instead of enqueueing them. A change then costs one queue
message (webhook -> NOTIFIED) instead of two, and its events leave with the
NOTIFIED invocation's. Larger sets (an overflowed row, "every folder") are
still enqueued, so several workers page them in parallel. The engine's
guarantees do not depend on who calls it: a folder leased elsewhere is
marked dirty, a throttled mailbox is deferred through the queue.

What a round must read: delta lags behind notifications, so a notified
round looks again later (``mailsync.sync.engine``) — two more delta rounds
per change. Outlook's notifications carry the changed version
(``@odata.etag``), which the pending row keeps; a round run in place gets,
per folder, the versions it must read there and the ids it must read
leaving it (``_expectations``), and skips the look-agains when it read them.

SYNC_ACCOUNT — the folder list and every known folder, incrementally
(polling, ``missed`` lifecycle events, after a subscription is created):
one SYNC_FOLDERS job marked ``every_folder``, which marks the folders' rows
dirty in one table batch and works them in its own invocation after the
folder list (a quiet account's sweep costs one queue message, not one per
folder; folders with changes hand the rest to a continuation).

SUBSCRIPTION — ensure / renew / recreate the account's subscription
(``mailsync.monitoring.subscriptions``). A new Outlook account's first job
is a SUBSCRIPTION marked ``THEN_SYNC``: it creates both subscriptions, then
runs the initial sync in the same invocation (no queue hop). Graph notifies
only the changes made after a subscription exists, so whatever comes before
needs a sweep; run after the subscriptions, the initial sync is that sweep
(a ``SUBSCRIBED`` one when a subscription was created), instead of a second
pass over every folder the initial sync had read moments before (and its
look-agains: see ``mailsync.sync.engine``, ``_sweep_again``). The sync
starts whatever the subscriptions' fate: refused by Graph (recorded, retried
by the renewer, which sweeps after it creates one), webhooks off (polled).

Taking the row (why the job deletes it *before* it reads the mailbox): the
webhook writes nothing for a notification the row already holds (Graph
redelivers notifications, and a replay must stay free). A second change to
a pending message looks exactly like a replay, though, so it must find the
row only while nothing has read the mailbox for it yet. The job therefore
reads the row and deletes it with the ETag it read before it reads the
mailbox (its lookups at Graph, its rounds' delta): a notification that arrives afterwards finds no row, creates one
and enqueues another NOTIFIED job (another look), while one that arrived
before is covered by this job's reads, which come after it. A delete that
fails means notifications were merged meanwhile: the job reads the row
again. Deleting after the sync, as before, lost such a change until the
next notification or the 6-hour sweep whenever it arrived during the job's
folder rounds.

When the store alone resolves the notifications (updates and deletions of
messages it holds: no Graph lookup), nothing reads the mailbox before the
first folder round, so that round takes the row: its delete, ETag-checked,
rides in the entity-group transaction that takes the round's slot and lease
(``TAKE_PENDING``; on its own first when the round cannot take both that
way). A row changed since the job read it refuses the transaction, nothing
is written, and the job reads the row again (``PendingChanged``). With
lookups (new mail, moves) the same holds when every id looked up came with
its version: the lookup reads the mailbox, but a change to one of those
messages before the take carries another version, which the webhook writes
into the row (a changed version is never a replay), so the take is refused
and the job resolves again. When one came without a version, the job takes
the row before it asks Graph.

Cost: the row lives in the account's partition of the sync table
(``mailsync.storage.subscriptions``), so the job reads it with the one
partition query its first folder round needs anyway (handed to that round,
which then starts from it instead of reading again), and takes it with that
round's slot and lease: one table call for the row and the round's start,
where a read of the row, its delete and the round's own read were three.

Settling (why a job may put itself back once): the webhook holds a NOTIFIED
job for the delta lag its process learnt (``mailsync.monitoring.delta_lag``)
after the row's *first* notification; notifications merged into the row
later are younger than that when the job starts, and a round reading delta
for them inside the lag misses their version and looks again 2 s later (a
queue message, a partition read, a slot-and-lease take, a finish and a
delta request). On the sandbox ~80 % of the look-agains were that: rounds
0.1-0.9 s after their row's newest notification. So a job whose row's newest
notification is younger than the learnt lag waits out the rest before it
resolves anything: in place when that is at most ``SETTLE_IN_PLACE_S`` (the
thread sleeps; nothing is held, the row is not taken yet and stays the gate,
so notifications merged meanwhile refuse the take and are read with it),
else through the queue (it enqueues itself for the rest, whole seconds, and
leaves the row as it is). Either way it settles once: a row that keeps
receiving notifications is not put off for ever. In place costs a thread for
under a second and nothing else; a look-again was a queue message (a send,
the host's receives, a delete) *and* a round, and the change shows a second
sooner. Zero lag learnt (a provider whose delta shows a change before its
notification arrives): no settling.

With notified states (``mailsync.monitoring.notified_states``) the page
already shows what most jobs confirm, so the webhook holds those jobs a
second past the learnt lag (``notifications.CONFIRM_MARGIN_S``, through the
queue's visibility: no thread waits): notifications merged during that
second are settled when the job starts, and more share a job. The
remaining settles stay in place: measured at 30 accounts and 8 changes/s,
settling through the queue instead cost 2.86 queue transactions per change
against 2.47 in place (217 NOTIFIED runs against 174, the same Graph and
table figures), for a thread held under a second by some jobs.

Crash safety of NOTIFIED: a job that dies after taking the row (host killed,
a bug raised) is redelivered by the queue and finds no row. It cannot know
what the row held, so a *redelivered* NOTIFIED job that finds no row syncs
the folder list and every folder (``SYNC_FOLDERS`` marked ``every_folder``,
run in the same delivery, which also frees the leases the dead run held).
A first delivery that finds no row is a duplicate and does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from mailsync.errors import Conflict, MailsyncError, NotFound, PendingChanged, PoisonJob, ProviderError
from mailsync.jobs import (
    EVERY_FOLDER,
    EXPECT,
    NOTIFIED_AT,
    NOTIFIED_REDELIVERED,
    SUBSCRIBED,
    TAKE_PENDING,
    THEN_SYNC,
    Expected,
    JobKind,
    new_job,
)
from mailsync.models import Account, Job
from mailsync.monitoring.recent_accounts import RecentAccounts
from mailsync.monitoring.records import (
    AccountDirectory,
    ChangeType,
    MessageLocator,
    PendingChanges,
    PendingStore,
    SubscriptionKind,
)
from mailsync.monitoring.subscriptions import WATCHED_STATUSES, SubscriptionManager
from mailsync.ports import JobQueue, MessageStore
from mailsync.storage.sync_rows import AccountSyncState

log = logging.getLogger("mailsync.monitoring.handler")

MONITORING_KINDS = frozenset({JobKind.NOTIFIED.value, JobKind.SYNC_ACCOUNT.value, JobKind.SUBSCRIPTION.value})
MAX_LOOKUPS = 25          # Graph GETs per NOTIFIED job at most (keeps the job short)
MAX_ROUNDS = 10           # re-reads of a pending row that keeps changing under us
DIRECT_MAX_JOBS = 4       # sync jobs a NOTIFIED job runs itself (more: enqueued for several workers)
SETTLE = "settle"         # reason (and attribute) of a NOTIFIED job put back until its newest notification settles
MIN_SETTLE_S = 0.05       # younger than the lag by less than this: not worth a wait
SETTLE_IN_PLACE_S = 1.0   # waits up to this are slept in the invocation; longer ones go through the queue

# Runs a sync job in this invocation, given the account as the NOTIFIED job just read it (None: read
# it), and the account's sync rows to start from (the first job: as read with the pending row; a later
# one: as the job before ended with them; None: read them). Returns the rows it ended with, or None.
DirectRunner = Callable[[Job, Account | None, AccountSyncState | None], AccountSyncState | None]
# Reads an account's sync rows (and, in the same partition, its pending row): one table query.
RowsLoader = Callable[[str], AccountSyncState]
# How long delta lags behind notifications here, as learnt (``DeltaLag.delay_s``); 0: no lag seen.
LagEstimate = Callable[[], float]


class MonitoringJobs:
    """Runs NOTIFIED, SYNC_ACCOUNT and SUBSCRIPTION jobs."""

    def __init__(self, pending: PendingStore, accounts: AccountDirectory, store: MessageStore,
                 locator: MessageLocator, subscriptions: SubscriptionManager, queue: JobQueue,
                 rows: RowsLoader, *, recent: RecentAccounts | None = None, lag: LagEstimate | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``recent``: reuse this process's recent reads of an account for NOTIFIED jobs
        (``mailsync.monitoring.recent_accounts``); None reads the account for every job. ``lag``: the
        delta lag learnt here (``DeltaLag.delay_s``), which a job whose newest notification is younger
        waits out on the queue (the module docstring's "Settling"); None: never."""
        self._lag = lag
        self._clock = clock
        self._sleep = sleep
        self._pending = pending
        self._rows = rows
        self._accounts = accounts
        self._recent = recent
        self._store = store
        self._locator = locator
        self._subscriptions = subscriptions
        self._queue = queue

    @staticmethod
    def handles(kind: str) -> bool:
        return kind in MONITORING_KINDS

    def run(self, job: Job, direct: DirectRunner | None = None, *, redelivered: bool = False) -> None:
        """Run one monitoring job; ``direct`` runs a sync job in this invocation (see the module docstring).

        ``redelivered``: the queue delivered this message before (its earlier run may have died).
        """
        if job.kind == JobKind.NOTIFIED:
            self.notified(job.account_id, direct, redelivered=redelivered, settled=job.reason == SETTLE)
        elif job.kind == JobKind.SYNC_ACCOUNT:
            self.sync_account(job.account_id, reason=job.reason or "sync_account")
        elif job.kind == JobKind.SUBSCRIPTION:
            self.subscription(job, direct)
        else:
            raise PoisonJob(f"not a monitoring job: {job.kind}")

    # -- NOTIFIED ---------------------------------------------------------------------

    def notified(self, account_id: str, direct: DirectRunner | None = None, *,
                 redelivered: bool = False, settled: bool = False) -> list[Job]:
        """Take the account's pending notifications and sync what they name; returns the sync jobs enqueued or run.

        ``settled``: this job was put back once already to let its notifications settle (never twice).
        """
        for _ in range(MAX_ROUNDS):
            # The pending row shares the account's sync partition: one query reads it and the
            # rows the first round starts from (that round's own read, saved).
            rows = self._rows(account_id)
            pending = self._pending.from_rows(rows)
            if pending is None:
                # Already handled (a duplicate job), or taken by this message's earlier, dead run.
                return self._after_a_lost_run(account_id, direct) if redelivered else []
            if not settled:
                settled = True
                if self._settle(pending):
                    return []
            try:
                # Its sync rows (read above) show the account still linked: a read of it moments ago will do.
                account = self._recent.get(account_id, linked=rows.folder_list is not None) \
                    if self._recent is not None else self._accounts.get(account_id)
                if account is None or account.status not in WATCHED_STATUSES:
                    self._take(pending)          # nothing stays behind
                    return []
                # The row is taken before the mailbox is read (module docstring): before the lookups,
                # or by the first round with its slot and lease.
                return self._dispatch(self._resolve(pending, rows), account, pending, direct, rows)
            except PendingChanged:
                continue  # more notifications merged since the read, nothing read yet: read the row again
        # Still changing after many reads: let a fresh job carry on instead of looping.
        self._queue.enqueue(new_job(JobKind.NOTIFIED, account_id, reason="continue"))
        return []

    def _settle(self, pending: PendingChanges) -> bool:
        """Wait until the row's newest notification is as old as the learnt lag (module docstring, "Settling").

        True when the job was put back on the queue for it (this run ends), False when it may go on
        (nothing to wait for, or waited in place).
        """
        lag = self._lag() if self._lag is not None else 0.0
        if lag <= 0 or pending.all_folders:
            return False
        # At most the lag: a newest notification "from the future" is another process's clock running ahead.
        wait = min(lag, lag - (self._clock() - pending.newest_at).total_seconds())
        if wait < MIN_SETTLE_S:
            return False
        if wait <= SETTLE_IN_PLACE_S:
            log.info("notifications younger than delta's lag: waiting in place", extra={"delay_s": round(wait, 3)})
            self._sleep(wait)
            return False
        # The row stays as it is, the gate for later notifications; the job comes back once it settled.
        self._queue.enqueue(new_job(JobKind.NOTIFIED, pending.account_id, reason=SETTLE), delay_s=wait)
        log.info("notifications younger than delta's lag: coming back", extra={"delay_s": round(wait, 3)})
        return True

    def _after_a_lost_run(self, account_id: str, direct: DirectRunner | None) -> list[Job]:
        account = self._accounts.get(account_id)
        if account is None or account.status not in WATCHED_STATUSES:
            return []
        log.info("a redelivered NOTIFIED job found no pending row; syncing every folder")
        job = new_job(JobKind.SYNC_FOLDERS, account_id, reason=NOTIFIED_REDELIVERED, attrs={EVERY_FOLDER: "1"})
        return self._run_or_enqueue([job], account, direct)

    def _take(self, pending: PendingChanges) -> None:
        """Delete the pending row as read; ``PendingChanged`` when notifications were merged since."""
        try:
            self._pending.delete(pending)
        except Conflict as exc:
            raise PendingChanged("pending notifications changed since they were read") from exc

    def _resolve(self, pending: PendingChanges, rows: AccountSyncState) -> _Resolved:
        """The folders to sync, whether the folder list needs a round too, and what each round must read.

        Takes the pending row before the lookups read the mailbox (``_Resolved.taken``); the store's
        copy is ours, not the mailbox, so a resolution from it alone leaves the take to the rounds.
        """
        account_id = pending.account_id
        # The folders we know: their sync rows, read with the pending row (the folder-list round
        # writes a folder's row and its store document together; this was a store search per job).
        known = set(rows.folders)
        if pending.all_folders:
            return _Resolved(known, True)
        folders: set[str] = set()
        lookups: list[str] = []
        where: dict[str, str | None] = {}      # message id -> the folder the store holds it in
        ids = list(dict.fromkeys(mid for _, mid in pending.changes))
        held = self._store.get_messages(account_id, ids) if ids else {}   # one multi-get, not a read per id
        for message_id in ids:
            types = {ct for ct, mid in pending.changes if mid == message_id}
            stored = held.get(message_id)
            where[message_id] = stored.folder_id if stored is not None else None
            if stored is not None:
                folders.add(stored.folder_id)
            if (stored is None and types != {ChangeType.DELETED.value}) or ChangeType.CREATED.value in types:
                lookups.append(message_id)
        versions = dict(pending.versions)
        # Where their created notifications said they landed (rich notifications): no lookup for those.
        # Like the store's copy, it reads nothing of the mailbox, so the take may wait for the round.
        notified_in = {mid: folder for mid, folder in pending.folders if folder and mid in lookups}
        located: dict[str, str | None] = dict(notified_in)
        asks = [mid for mid in lookups if mid not in notified_in]
        take_first = False
        if asks:
            if len(asks) > min(MAX_LOOKUPS, max(1, len(known))):
                log.info("%d messages to locate; syncing every folder instead", len(asks))
                return _Resolved(known, True)
            # The lookups read the mailbox. When every id they look up came with its version, the take
            # may wait for the first round's transaction: a change to one of them meanwhile carries
            # another version, which the webhook writes into the row (never a replay), so the take's
            # ETag check refuses and the job resolves again. Without a version such a change would
            # look like a replay and be dropped while the row is pending: take it first.
            take_first = not all(versions.get(mid) for mid in asks)
            if take_first:
                self._take(pending)
            try:
                located.update(self._locator.parent_folders(account_id, asks))
            except (ProviderError, NotFound) as exc:
                log.info("locating notified messages failed (%s); syncing every folder", exc.code)
                return _Resolved(known, True, taken=take_first)
        folders.update(folder for folder in located.values() if folder is not None)
        # A folder subscription's notification: one folder-list round (names, parents, new and gone folders).
        return _Resolved(folders, bool(folders - known) or pending.folders_changed,
                         _expectations(pending, where, {mid: located.get(mid) for mid in lookups}),
                         taken=take_first)

    def _dispatch(self, resolved: _Resolved, account: Account, pending: PendingChanges,
                  direct: DirectRunner | None, rows: AccountSyncState) -> list[Job]:
        jobs = _sync_jobs(account.account_id, sorted(resolved.folders), resolved.folder_list, reason="notified")
        in_place = direct is not None and len(jobs) <= DIRECT_MAX_JOBS
        log.info("notifications resolved to %d folder(s)", len(resolved.folders),
                 extra={"changes": len(pending.changes), "all_folders": pending.all_folders,
                        "jobs": len(jobs), "direct": in_place, "expected": len(resolved.expected)})
        if in_place:
            # Only jobs run here carry what their round must read (a queue message could not hold it).
            notified_at = f"{pending.newest_at.timestamp():.3f}"
            jobs = [replace(job, attrs={**job.attrs, EXPECT: resolved.expected[job.folder_id].encode(),
                                        NOTIFIED_AT: notified_at})
                    if job.folder_id is not None and job.folder_id in resolved.expected else job for job in jobs]
        if not resolved.taken:
            if in_place and jobs and jobs[0].kind == JobKind.SYNC_FOLDER and pending.etag is not None:
                # The first round takes the row with its slot and lease (one transaction instead of two).
                jobs[0] = replace(jobs[0], attrs={**jobs[0].attrs, TAKE_PENDING: pending.etag})
            else:
                self._take(pending)
        return self._run_or_enqueue(jobs, account, direct, rows)

    def _run_or_enqueue(self, jobs: list[Job], account: Account, direct: DirectRunner | None,
                        rows: AccountSyncState | None = None) -> list[Job]:
        if direct is not None and len(jobs) <= DIRECT_MAX_JOBS:
            for job in jobs:
                # The first round starts from the rows read with the pending row (read before the row
                # was taken and the messages resolved), each later one from the rows the round before
                # ended with (read, or known, after its last write: ``SyncEngine.run_in_place``). Every
                # take from them is ETag-conditional, so a row changed meanwhile only costs a re-read.
                rows = direct(job, account, rows)
            return jobs
        return self._enqueue(jobs)

    # -- SYNC_ACCOUNT -----------------------------------------------------------------

    def sync_account(self, account_id: str, *, reason: str) -> list[Job]:
        account = self._accounts.get(account_id)
        if account is None or account.status not in WATCHED_STATUSES:
            return []
        return self._enqueue([new_job(JobKind.SYNC_FOLDERS, account_id, reason=reason, attrs={EVERY_FOLDER: "1"})])

    # -- SUBSCRIPTION -----------------------------------------------------------------

    def subscription(self, job: Job, direct: DirectRunner | None = None) -> None:
        """Run a SUBSCRIPTION job; one marked ``THEN_SYNC`` then starts the initial sync (module
        docstring), in this invocation through ``direct`` when given, else through the queue."""
        action = job.attrs.get("action", "ensure")
        subscription_id = job.attrs.get("subscription_id")
        if action == "ensure" and job.attrs.get(THEN_SYNC) == "1":
            self._subscribe_then_sync(job, direct)
        elif action == "ensure":
            self._subscriptions.ensure(job.account_id)
        elif action == "renew":
            self._subscriptions.renew(job.account_id, subscription_id)
        elif action == "recreate" and subscription_id:
            self._subscriptions.recreate(job.account_id, subscription_id)
        else:
            raise PoisonJob(f"unknown subscription action {action!r}")

    def _subscribe_then_sync(self, job: Job, direct: DirectRunner | None) -> None:
        try:
            found = self._subscriptions.ensure_before_sync(job.account_id)
        except MailsyncError:
            # The sync never waits on the subscriptions; the redelivery ensures them again, and a
            # creation then sweeps (the sync below is no longer "after" it).
            self._start_sync(job, frozenset(), None, direct)
            raise
        self._start_sync(job, found.made, found.account, direct)

    def _start_sync(self, job: Job, made: frozenset[SubscriptionKind], account: Account | None,
                    direct: DirectRunner | None) -> None:
        """The initial sync, queued or run in place (``account``: as just read, or None: the engine reads it)."""
        if SubscriptionKind.MESSAGES in made:
            # The sweep a new messages subscription needs (every folder, the folder list, and the
            # look-again for what delta did not show yet); on a new account it is the initial sync.
            sync = new_job(JobKind.SYNC_FOLDERS, job.account_id, reason=SUBSCRIBED, attrs={EVERY_FOLDER: "1"})
        elif made:
            sync = new_job(JobKind.SYNC_FOLDERS, job.account_id, reason=SUBSCRIBED)  # the folder list's
        else:
            sync = new_job(JobKind.SYNC_FOLDERS, job.account_id, reason=job.reason)
        if direct is None:
            self._enqueue([sync])
        else:
            direct(sync, account, None)

    # -- common -----------------------------------------------------------------------

    def _enqueue(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            try:
                self._queue.enqueue(job)
            except MailsyncError:
                log.warning("enqueue failed after %d of %d jobs", jobs.index(job), len(jobs))
                raise
        return jobs


@dataclass(frozen=True)
class _Resolved:
    """What a row of notifications comes to: folders to sync, a folder-list round, what each round must read."""

    folders: set[str]
    folder_list: bool
    expected: Mapping[str, Expected] = field(default_factory=dict)
    taken: bool = False      # the pending row was taken (before lookups read the mailbox)


def _expectations(pending: PendingChanges, stored_in: Mapping[str, str | None],
                  located: Mapping[str, str | None]) -> dict[str, Expected]:
    """Per folder, the versions and removals its round must read to have seen every notification naming it.

    Why: delta lags behind notifications, so a notified round looks again
    later (``mailsync.sync.engine``), a second and third delta round per
    change. A round that read exactly the notified version of every message
    its notifications name has seen them, and needs no look-again. Per id:

    * the folder the store holds it in, when it left that folder (the lookup
      found it elsewhere or gone, or it was deleted and not looked up): the
      round must read it leaving;
    * otherwise (updated in place, or found there again): the round must
      read the notified version there;
    * the folder the lookup found it in, if another: the notified version.

    A folder with an id of unknown version (two tags, or none) gets no
    expectation: its round looks again as it always did.
    """
    versions = dict(pending.versions)
    wanted: dict[str, dict[str, str]] = {}
    removed: dict[str, set[str]] = {}
    unknowable: set[str] = set()

    def want(folder: str, message_id: str) -> None:
        tag = versions.get(message_id)
        if not tag:
            unknowable.add(folder)
        else:
            wanted.setdefault(folder, {})[message_id] = tag

    for message_id in dict.fromkeys(mid for _, mid in pending.changes):
        types = {ct for ct, mid in pending.changes if mid == message_id}
        source = stored_in.get(message_id)
        looked_up = message_id in located
        now_in = located.get(message_id)
        if source is not None:
            if (looked_up and now_in != source) or (not looked_up and ChangeType.DELETED.value in types):
                removed.setdefault(source, set()).add(message_id)
            else:
                want(source, message_id)
        if now_in is not None and now_in != source:
            want(now_in, message_id)
    return {folder: Expected(wanted.get(folder, {}), frozenset(removed.get(folder, ())))
            for folder in set(wanted) | set(removed) if folder not in unknowable}


def _sync_jobs(account_id: str, folders: Iterable[str], folder_list: bool, *, reason: str) -> list[Job]:
    jobs: list[Job] = []
    if folder_list:
        jobs.append(new_job(JobKind.SYNC_FOLDERS, account_id, reason=reason))
    jobs.extend(new_job(JobKind.SYNC_FOLDER, account_id, folder, reason=reason) for folder in folders)
    return jobs
