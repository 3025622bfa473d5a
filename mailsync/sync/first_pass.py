"""A new account's first pass: every small folder's first round at once, in the folder list's invocation.

Why
===

A sandbox mailbox has ~13 folders, most of them empty or nearly so, and a
real one is much the same: a dozen small system folders beside a few large
ones. One folder's first round on its own costs a queue hop, a slot, a
lease, a full-round start, a page, a bulk request, ``remove_stale`` (a
refresh, a delete-by-query, the seen marks' refresh and read), a finish, a
progress read and a folder-phase update: ~8-10 table calls and ~5 store
requests for a folder that holds nothing. Onboarding 1,000 accounts paid
that ~13,000 times (docs/scaling.md, "Onboarding").

What it does
============

Right after the folder list's round created the rows, while the
invocation still holds its request slot, the folders the folder list
counted at most ``policy.FIRST_PASS_FOLDER_MAX`` messages in (and at most
``policy.FIRST_PASS_MAX_MESSAGES`` together) go through one pass::

    take every lease + begin every first round     one table transaction (≤ 100 rows each)
    read each folder's first page                  one provider request per folder
    write every message of every folder            one bulk request
    give every lease back with its final cursor    one table transaction
    the folders' phases, one refresh               two store requests

A folder whose first page was its whole round (Graph's deltaLink) is done:
its row gets the round's final cursor and ``rounds = 1`` in the release.
One whose first page was not (more mail than the folder list said) keeps
the page's link, mid-round, and goes on in rounds of its own like any
other; so do the folders the pass did not take, the ones it could not read
and the ones it never reached (``_fan_out`` after it).

Why no ``remove_stale``
=======================

A full round's end deletes the folder's documents the round did not see:
what an earlier epoch wrote and is gone since. The pass takes only rows
that ``policy.never_written``: created in the store's current generation,
no cursor, and no full round ever begun (``round_started`` is written in
the same transaction that takes the lease, before any message is; the first
screen writes it before writing the Inbox's newest messages). Nothing was
ever written for such a folder, so there is nothing stale to delete. Every
other path keeps it: a resync (requested, 410, a lost store: another
generation), a cursor lost mid-round, a folder whose pass failed after its
write (its row says ``round_started``), the Inbox after a first screen.

The lease/dirty protocol holds: the leases are taken with ETag-conditional
writes on the rows as read (a row written since — marked dirty, leased — is
refused, and the pass leaves it to the ordinary path), and given back with
``release`` semantics: a ``dirty`` or ``resync`` mark set while the pass
ran refuses the batch, and the row-by-row release keeps the mark, so the
continuation runs the round the mark asked for. An unlinked account's rows
are gone by then: the release finds them deleted and the folders'
documents written meanwhile are removed (as ``_sync_folder`` does).
"""

from __future__ import annotations

import logging
from typing import Any

from mailsync.errors import MailsyncError, ProviderAuthError, ReauthRequired
from mailsync.models import Message, MessageBatch, MessagesChanged, Provider, SyncPhase
from mailsync.storage.sync_rows import AccountSyncState, Lease, SyncState
from mailsync.sync import policy
from mailsync.sync.invocation import InvocationBase, Outcome, StopInvocation, kept

log = logging.getLogger("mailsync.sync")


class FirstPassSync(InvocationBase):
    """The first-pass part of an invocation (run by the folder list's round)."""

    def _first_pass(self, rows: AccountSyncState) -> bool:
        """Run the first rounds of the account's small, never-written folders together (module docstring).

        Returns True when it wrote sync rows (the caller reads them again).
        """
        e = self.e
        generation = self._store_generation()
        chosen = _choose(rows, generation, e.clock(), self._first_page_size())
        if not chosen:
            return False
        now = e.clock()
        epoch = policy.next_epoch(max(row.epoch for row in chosen), now)
        leases = e.state.take_many(chosen, self.owner, cursor="", phase=SyncPhase.INITIAL, epoch=epoch,
                                   generation=generation, resync_requested=False, indexed=0, removed=0,
                                   rounds=0, round_started=now)
        if not leases:
            return False
        try:
            read = self._read_first_pages(leases)
            taken = {id(lease) for lease, _ in read}
            unread = [lease for lease in leases if id(lease) not in taken]
            written = self._write_first_pages(read, epoch)
            if written is None:   # the store refused: every folder goes the ordinary way (its row says begun)
                self._give_back([(lease, {}) for lease in leases])
                return True
            ends: list[tuple[Lease, dict[str, Any]]] = []
            for lease, batch in read:
                fields: dict[str, Any] = {"cursor": batch.cursor, "indexed": len(batch.upserts), "failures": 0}
                if batch.complete:
                    fields.update(phase=SyncPhase.INCREMENTAL, rounds=1, mid_round=False)
                else:
                    fields["mid_round"] = True     # the rest of the round goes on from the page's link
                ends.append((lease, fields))
            # Never read: nothing was written for them, so they are as new as before (no remove_stale needed).
            ends.extend((lease, {"round_started": 0.0}) for lease in unread)
            gone = set(self._give_back(ends))
        except StopInvocation:
            raise
        except BaseException:
            # Rows as taken (a round begun, round_started set): the ordinary rounds take them from here.
            for lease in leases:
                self._release_quietly(lease)
            raise
        done = [lease.state.folder_id for lease, batch in read
                if batch.complete and lease.state.folder_id is not None and lease.state.folder_id not in gone]
        if done:
            self._retrying(lambda: e.store.set_folder_phases(self.account_id, done, SyncPhase.INCREMENTAL.value))
        if written:
            # "synced" (set next, from the rows) means the messages are searchable, as a round's
            # remove_stale (a refresh first) made it before.
            self._retrying(e.store.refresh)
        log.info("first pass", extra={"folders": len(read), "complete": len(done), "messages": self.upserted,
                                      "not_read": len(unread), "gone": len(gone)})
        return True

    def _first_page_size(self) -> int:
        """Messages the provider returns in one page of a folder's changes (the settings' page size)."""
        settings = self.e.settings
        return settings.imap_page_size if self.account.provider == Provider.IMAP else settings.graph_page_size

    def _read_first_pages(self, leases: list[Lease]) -> list[tuple[Lease, MessageBatch]]:
        """The folders' first pages, read together (``message_changes_many``: Graph's JSON batches, one
        round trip for up to 20 folders), in the leases' order, until a fault or the time budget stops
        the reads. A folder whose own read failed (throttled, gone) is left out: its round deals with it."""
        read: list[tuple[Lease, MessageBatch]] = []
        for start in range(0, len(leases), policy.READS_AT_ONCE):
            if self._time_left() <= 0:
                break
            chunk = leases[start:start + policy.READS_AT_ONCE]
            reads: list[tuple[str, str | None]] = []
            for lease in chunk:
                assert lease.state.folder_id is not None     # folder rows (the folder list's is never chosen)
                reads.append((lease.state.folder_id, None))
            try:
                pages = self._retrying(lambda r=reads: self._provider_().message_changes_many(r))  # type: ignore[misc]
            except (ProviderAuthError, ReauthRequired) as exc:
                for held in leases:
                    self._release_quietly(held)
                self._reauth(exc)
                raise StopInvocation(Outcome.REAUTH) from exc
            except MailsyncError as exc:
                # A lasting fault (throttled, unavailable): these folders and the rest go the
                # ordinary way, whose rounds back off, hold the mailbox or ask the folder list.
                log.info("first pass stops at a fault: %s", exc.code, extra={"error": exc.message})
                break
            faults = [page for page in pages if isinstance(page, MailsyncError)]
            read.extend((lease, page) for lease, page in zip(chunk, pages, strict=True)
                        if not isinstance(page, MailsyncError))
            if faults:
                log.info("first pass stops at a folder's fault: %s", faults[0].code,
                         extra={"error": faults[0].message, "faults": len(faults)})
                break
        return read

    def _write_first_pages(self, read: list[tuple[Lease, MessageBatch]], epoch: int) -> int | None:
        """Write every page read in one bulk request; the number of messages, or None when the store refused."""
        e = self.e
        upserts: dict[str, Message] = {}
        for number, (lease, batch) in enumerate(read):
            if e.before_write is not None and lease.state.folder_id is not None:
                e.before_write(lease.state.folder_id, self.pages + number)   # each folder's page, as a round's
            # Read one after the other: a message moved between two folders' reads is in both pages, and
            # the later read holds its newer state.
            for message in batch.upserts:
                upserts.pop(message.message_id, None)
                upserts[message.message_id] = message
        messages = list(upserts.values())
        try:
            result = self._retrying(lambda: e.store.upsert_messages(messages, epoch=epoch)) if messages else None
            for lease, batch in read:
                if batch.removals and lease.state.folder_id is not None:
                    folder_id = lease.state.folder_id
                    self._retrying(lambda f=folder_id, r=batch.removals:  # type: ignore[misc]
                                   e.store.remove_messages(self.account_id, f, r))
        except MailsyncError as exc:
            log.warning("first pass: the store refused its write: %s", exc.code, extra={"error": exc.message})
            return None
        self.pages += len(read)
        self.upserted += len(messages)
        self.removed_count += sum(len(batch.removals) for _, batch in read)
        for lease, batch in read:
            if (batch.upserts or batch.removals) and lease.state.folder_id is not None:
                self.changed.add(lease.state.folder_id)
        if result is not None and result.failed_ids:
            log.warning("%d message(s) dead-lettered by the store", len(result.failed_ids))
        # Folder by folder, in the pass's order (the Inbox first), as each folder's round would: the page
        # hears about its Inbox first. A message in two pages shows once, with its later state.
        stale = result.stale_ids if result is not None else ()
        for lease, batch in read:
            if lease.state.folder_id is None:
                continue
            shown = kept([m for m in batch.upserts if upserts.get(m.message_id) is m], stale)
            if shown or batch.removals:
                self.events.publish_changes(MessagesChanged(
                    self.account_id, upserted=tuple(shown),
                    removed=tuple((lease.state.folder_id, mid) for mid in batch.removals)))
        return len(messages)

    def _give_back(self, ends: list[tuple[Lease, dict[str, Any]]]) -> list[str]:
        """Release the leases with their fields; undo what was written for folders deleted meanwhile."""
        gone = self.e.state.release_many(ends)
        for folder_id in gone:
            # Deleted while we paged it (the folder list removed it, or the account was unlinked).
            self.e.store.remove_folder(self.account_id, folder_id)
        return gone


def _choose(rows: AccountSyncState, generation: str, now: float, page_size: int) -> list[SyncState]:
    """The folders the pass takes: never written, free and small, Inbox first, within the message budget."""
    chosen: list[SyncState] = []
    total = 0
    for row in policy.pending_order(rows.folders.values(), generation, now):
        if not policy.first_pass_fits(row, generation, now, page_size=page_size):
            continue
        size = row.expected or 0
        if total + size > policy.FIRST_PASS_MAX_MESSAGES:
            continue
        chosen.append(row)
        total += size
    return chosen
