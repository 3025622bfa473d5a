"""Notice a recreated store on the poll tick, and resync every account, spread out.

The store's generation (``MessageStore.generation``) changes when its
indices are created anew: deleted by hand, a cluster lost or restored from
an older snapshot, an in-memory store restarted. Every sync job compares it
with the generation its cursors were written in and starts over when they
differ, but a job only runs when something asks for one: a mail change, a
poll, the safety sweep hours later. An account whose mailbox is quiet would
show an empty list until then.

So the poll scheduler asks here on every tick (one small read of the
store, one table read). When the generation differs from the one recorded
last tick, every watched account gets a ``SYNC_FOLDERS`` job (the folder
list first; its round fans out to the folders, which all start over), with
visibility delays ``STORE_RESYNC_PER_S`` apart so a thousand accounts do
not all hit their providers and the store in the same second. Then the new
generation is recorded; a tick that dies in between enqueues again next
time, which is harmless (jobs are idempotent).

The same tick sweeps the store's bulk-load leases (see ``check``), and at
most once an hour per instance the action ledger's old entries
(``purge``: mailsync.store.action_ledger, kept a week past their last action).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mailsync.errors import MailsyncError
from mailsync.jobs import JobKind, new_job
from mailsync.monitoring.records import AccountDirectory
from mailsync.monitoring.subscriptions import WATCHED_STATUSES
from mailsync.ports import GenerationLedger, JobQueue, MessageStore

log = logging.getLogger("mailsync.monitoring.store_watch")

REASON = "store_generation"


class StoreWatch:
    """Compares the store's generation with the last one seen; resyncs every watched account on a change."""

    def __init__(self, store: Callable[[], MessageStore], ledger: GenerationLedger, accounts: AccountDirectory,
                 queue: JobQueue, *, per_s: float, purge: Callable[[], int] | None = None,
                 purge_every_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._ledger = ledger
        self._accounts = accounts
        self._queue = queue
        self._per_s = per_s
        self._purge = purge
        self._purge_every_s = purge_every_s
        self._clock = clock
        self._purged_at: float | None = None

    def _maybe_purge(self) -> None:
        now = self._clock()
        if self._purge is None or (self._purged_at is not None and now - self._purged_at < self._purge_every_s):
            return
        self._purged_at = now
        try:
            deleted = self._purge()
        except MailsyncError as exc:
            log.warning("could not purge the action ledger: %s", exc.code, extra={"error": exc.message})
            return
        if deleted:
            log.info("action ledger: %d old entries purged", deleted)

    def check(self) -> int:
        """Enqueue the resyncs if the store was recreated since the last check; returns how many.

        Also undoes the relaxed refresh of initial loads whose workers died
        (``MessageStore.expire_bulk_loads``), so a killed worker slows the
        store's refresh for a few minutes at most, never for good.
        """
        self._maybe_purge()
        store = self._store()
        try:
            store.expire_bulk_loads()
        except MailsyncError as exc:
            log.warning("could not check the store's bulk loads: %s", exc.code, extra={"error": exc.message})
        generation = store.generation()
        seen = self._ledger.seen()
        if generation == seen:
            return 0
        count = 0
        for account in self._accounts.iter_accounts():
            if account.status not in WATCHED_STATUSES:
                continue
            self._queue.enqueue(new_job(JobKind.SYNC_FOLDERS, account.account_id, reason=REASON),
                                delay_s=count / self._per_s)
            count += 1
        self._ledger.record(generation)
        if seen:
            log.warning("the store was recreated (generation %s, was %s): %d account(s) resync, %.0f s apart",
                        generation[:12], seen[:12], count, 1 / self._per_s)
        else:
            # First check of this deployment: nothing to compare with, so every account gets
            # one (cheap, incremental unless its cursors are of another generation) sync.
            log.info("store generation %s recorded; %d account(s) checked", generation[:12], count)
        return count
