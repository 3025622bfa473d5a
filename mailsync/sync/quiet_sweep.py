"""A safety sweep's quiet folders: one read each, and their rows written in one transaction.

Why: at rest, the sweeps are what an account costs (issue 18). Every
watched account is swept every ``POLL_INTERVAL_SUBSCRIBED_S`` (6 h) because
notifications can be lost without a ``missed`` event; a sweep lists the
folders and reads every folder's changes since its cursor. Almost always
nothing changed. Run as ordinary rounds, each folder cost a read of the
account's rows, a lease taken and a finish written: three table calls per
folder, 56 for a 13-folder sandbox mailbox, ~220 per account a day at four
sweeps (1,000 accounts: 2.6 table transactions a second for sweeps alone,
10,000: 26).

How: the sweep marks the folders ``dirty`` first, as before (so every path
that stops it early — a fault, the time budget, a dead worker — leaves its
intent on the rows for whoever holds a slot next). After the folder list,
the sweeping invocation reads the rows once and, for each marked folder at
rest (unleased, between incremental rounds, not backing off, nothing
asking for a full round), reads the changes since its cursor *without a
lease*. A read that comes back complete and empty is a quiet round: the
folder's new cursor, one more round and the cleared mark are written for
all such folders in one entity-group transaction, each conditional on the
ETag of that one read (``SyncStateTable.rest_quiet``). A folder with
changes, or whose row was written since the read (a notification's mark,
another worker's lease), keeps its mark, and the invocation's pending loop
runs its ordinary leased round.

Why reading without the lease is safe: the lease makes one worker at a
time *write* a folder's pages and cursor; a quiet read writes no page, and
its cursor is written only if the row is exactly as it was before the
read, i.e. nobody began or ended a round in between. A change made after
the read is after the new cursor too, and its notification's round (or the
next sweep) reads it; delta's lag is the look-agains' business, as for any
round. One cost, bounded: Outlook keeps a folder's newest three delta links,
and a read issues one. A worker that leased the folder right after our
read of the rows and pages a multi-page round could see its saved link
pushed out by ours if it also died before saving the next: its folder then
restarts its round (SyncStateNotFound → resync: always safe, only slower).

Graph: a read per folder (a changed folder reads again in its leased round,
as sweeps rarely find anything), asked for together
(``MailProvider.message_changes_many``): one JSON batch per 20 folders, so a
sweep of a 13-folder mailbox is one round trip for its folders instead of
13. Graph still counts each item against the mailbox's limits.
"""

from __future__ import annotations

import logging

from mailsync.errors import CursorExpired, MailsyncError, NotFound
from mailsync.models import SyncPhase
from mailsync.storage.sync_rows import SyncState
from mailsync.sync import policy
from mailsync.sync.invocation import InvocationBase

log = logging.getLogger("mailsync.sync")


def at_rest(row: SyncState, generation: str, now: float) -> bool:
    """A marked folder a quiet read may stand in for: between incremental rounds and free.

    Anything else (a round in progress or due in full, a lease, a back-off, a
    failing folder) goes through its ordinary round, which knows what to do.
    """
    return (row.dirty and not row.leased(now) and row.phase == SyncPhase.INCREMENTAL and row.rounds > 0
            and bool(row.cursor) and not row.mid_round and not row.resync_requested
            and row.not_before <= now and row.failures == 0 and not policy.needs_full_round(row, generation))


class QuietSweep(InvocationBase):
    """The sweep half of an invocation: quiet folders read and put to rest together."""

    sweeping = False    # set by the invocation's target: an every-folder sweep that marked its folders

    def _rest_quiet_folders(self) -> int:
        """Read each marked folder at rest once; write the quiet ones' rows in one transaction.

        Returns how many folders were put to rest. Stops reading at the first
        fault or when the time budget runs low: the folders not read keep their
        marks for the pending loop (or a continuation), whose rounds deal with
        the fault as always.
        """
        e = self.e
        # Rows read after this invocation's last write of them (the folder list's end read them) serve as
        # well as a fresh read: what matters is a read before the folders' reads below, whose ETags then
        # refuse the rest of any row a round began or ended on since.
        rows = self.rows if self.rows_current and self.rows is not None else self._load()
        generation = self._store_generation()
        now = e.clock()
        quiet: list[tuple[SyncState, str]] = []
        read = 0
        marked = [row for row in rows.folders.values() if at_rest(row, generation, now)]
        # Read together (Graph: one JSON batch per READS_AT_ONCE folders, one round trip instead of one each).
        for start in range(0, len(marked), policy.READS_AT_ONCE):
            if self.end_now or self._time_left() <= 0.2 * e.settings.sync_time_budget_s:
                break
            chunk = marked[start:start + policy.READS_AT_ONCE]
            reads: list[tuple[str, str | None]] = []
            for row in chunk:
                assert row.folder_id is not None
                reads.append((row.folder_id, row.cursor))
            try:
                pages = self._provider_().message_changes_many(reads)
            except MailsyncError as exc:
                log.info("sweep: quiet reads stop at a fault: %s", exc.code)
                break
            fault: MailsyncError | None = None
            for row, page in zip(chunk, pages, strict=True):
                if isinstance(page, (CursorExpired, NotFound)):
                    continue         # its round resyncs it, or asks the folder list
                if isinstance(page, MailsyncError):
                    fault = fault or page
                    continue
                read += 1
                if page.complete and not page.upserts and not page.removals:
                    quiet.append((row, page.cursor))
            if fault is not None:
                log.info("sweep: quiet reads stop at a fault: %s", fault.code)
                break
        rested = e.state.rest_quiet(quiet)
        self.rows_current = False
        log.info("sweep: quiet folders put to rest together",
                 extra={"folders_read": read, "folders_quiet": len(quiet), "folders_rested": rested})
        return rested
