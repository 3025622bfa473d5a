"""The folder list: one round of the provider's folder changes, and what follows from it.

A folder-list round creates the rows of new folders, renames and moves the
ones we hold, removes the ones gone (with their mail, only if we ever
synced them), shows the newest Inbox messages first once per account, and
fans the folders' first rounds out over the mailbox's request slots.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mailsync.errors import CursorExpired, LeaseLost, MailsyncError, ProviderAuthError, ReauthRequired
from mailsync.models import AccountStatus, Folder, MessagesChanged, SyncPhase
from mailsync.storage.sync_rows import AccountSyncState, Lease, SyncState
from mailsync.sync import policy
from mailsync.sync.first_pass import FirstPassSync
from mailsync.sync.invocation import FOLDER_LIST, Outcome, StopInvocation, all_rows, kept

log = logging.getLogger("mailsync.sync")


class FolderListSync(FirstPassSync):
    """The folder-list half of an invocation."""

    def _sync_folder_list(self) -> None:
        e = self.e
        read = self.rows
        try:
            lease = e.state.acquire(self.account_id, None, self.owner, known=self._known(None)) \
                if not self.is_continuation else self._acquire_quietly(None)
        except LeaseLost:
            return
        # The rows read before the take are the first round's start when no folder-list round ran since
        # (only those create or delete folder rows): the take went through on that read's copy of the
        # row, unchanged, and nobody held it then. Else, and for every later round, they are read again.
        start = read if read is not None and lease is not None and lease.from_known \
            and read.folder_list is not None and not read.folder_list.lease_owner else None
        held: Lease | None = lease
        while held is not None:
            box = [held]
            rows, start = start, None
            try:
                held = self._folder_list_round(box, rows)
            except StopInvocation:
                raise
            except CursorExpired:
                # The folder-list cursor is gone: run a full round right away.
                held = e.state.save(box[0], cursor="", resync_requested=True)
            except (ProviderAuthError, ReauthRequired) as exc:
                self._release_quietly(box[0])
                self._reauth(exc)
                raise StopInvocation(Outcome.REAUTH) from exc
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
                raise StopInvocation(Outcome.DEFERRED) from exc
            except BaseException:
                self._release_quietly(box[0])
                raise

    def _folder_list_round(self, box: list[Lease], rows: AccountSyncState | None = None) -> Lease | None:
        """One round of the folder list; ``box[0]`` always holds the latest lease (for the caller's error path).

        ``rows``: the account's rows as the round begins, when the caller knows them (else read here).
        """
        e = self.e
        generation = self._store_generation()
        start = box[0].state
        full = policy.needs_full_round(start, generation)
        # A recreated store holds nothing of the account: its sync starts over as an initial one.
        rounds = 0 if policy.store_lost(start, generation) else start.rounds
        if rounds < start.rounds:
            self._store_lost()
        if rows is None:
            rows = self._load()
        if full:
            box[0] = e.state.save(box[0], cursor="", epoch=policy.next_epoch(start.epoch, e.clock()),
                                  generation=generation, resync_requested=False, rounds=rounds,
                                  first_screen=start.first_screen and start.generation == generation,
                                  phase=SyncPhase.INITIAL if rounds == 0 else SyncPhase.RESYNC)
        cursor = None if full else start.cursor
        seen: set[str] = set()
        created: list[Folder] = []
        screen_to_pass = False
        while True:
            batch = self._retrying(lambda c=cursor: self._provider_().folder_changes(c))  # type: ignore[misc]
            self._apply_folders(batch.upserts, batch.removals, rows, generation, created)
            if batch.upserts or batch.removals:
                self.changed.add(FOLDER_LIST)
            seen.update(folder.folder_id for folder in batch.upserts)
            cursor = batch.cursor
            if not box[0].state.first_screen and not screen_to_pass:
                if _small_new_inbox(created, self._first_page_size()):
                    # The first pass right after this round writes all of it (mailsync.sync.first_pass), as
                    # soon as an invocation of its own would show its newest; the flag goes with the finish.
                    log.info("first screen left to the first pass")
                    screen_to_pass = True
                else:
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
        finished = e.state.finish(box[0], cursor=cursor, phase=SyncPhase.INCREMENTAL, rounds=rounds + 1,
                                  failures=0, **({"first_screen": True} if screen_to_pass else {}))
        after = self._load()
        self.rows_current = True   # nothing below writes a sync row but the first pass, which reads them again
        self._publish_progress(None, SyncPhase.INCREMENTAL.value if rounds else "folders", after)
        # Folders never written (new ones, or ones whose first round has not begun): the small ones'
        # first rounds all at once, here (mailsync.sync.first_pass); the rest one job each.
        passed = self._first_pass(after)
        if passed:
            after = self._load()
        if created or full or passed:
            self._fan_out(after)
        was = self.account.status
        if rounds == 0:
            self._maybe_synced(after)   # a mailbox without folders (or of small ones only) is synced right away
        if not (was == AccountStatus.SYNCING and self.account.status == AccountStatus.SYNCED):
            # (Becoming synced wrote the mailbox document already.)
            self._upsert_mailbox(self.account.status)
        return finished

    def _apply_folders(self, upserts: Sequence[Folder], removals: Sequence[str], rows: AccountSyncState,
                       generation: str, created: list[Folder]) -> None:
        e = self.e
        # Rows this round created from an earlier batch are not in ``rows`` (read as the round began):
        # the first round's roles batch lists the well-known folders again, now with their roles.
        # Creating them again was refused (the transaction, then each row: a create and a read per
        # folder) and left the rows without their roles.
        earlier = {f.folder_id: f for f in created}
        new = [f for f in upserts if f.folder_id not in rows.folders and f.folder_id not in earlier]
        known = [f for f in upserts if f.folder_id in rows.folders or f.folder_id in earlier]
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
        changed = []
        for folder in known:
            row = rows.folders.get(folder.folder_id)
            was = (row.name, row.role, row.expected, row.parent_id, row.unread, row.children) if row is not None \
                else _info(earlier[folder.folder_id])
            if was != _info(folder):
                changed.append({"folder_id": folder.folder_id, "name": folder.name, "role": folder.role,
                                "expected": folder.total_count, "parent_id": folder.parent_id,
                                "unread": folder.unread_count, "children": folder.child_folder_count})
        if changed:
            e.state.update_info_many(self.account_id, changed)
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
        if inbox is not None and inbox.folder_id is not None and policy.first_pass_fits(
                inbox, generation, e.clock(), page_size=self._first_page_size()):
            # A small Inbox not created by this round (a redelivery's): the first pass writes all of it.
            log.info("first screen left to the first pass", extra={"expected": inbox.expected})
        elif inbox is not None and inbox.folder_id is not None:
            folder_id = inbox.folder_id
            inbox_lease = self._acquire_quietly(folder_id)
            if inbox_lease is not None:
                try:
                    state = inbox_lease.state
                    if not state.cursor or state.generation != generation:
                        # Written before the write: the Inbox now holds documents of its current epoch,
                        # which its first full round (one epoch later) must check (remove_stale).
                        inbox_lease = e.state.save(inbox_lease, round_started=e.clock())
                        messages = tuple(self._retrying(
                            lambda: self._provider_().newest_messages(folder_id, e.settings.first_screen_messages)))
                        # The Inbox's current epoch: its first full round runs one
                        # epoch later, so it rewrites these or removes them as stale.
                        written = e.store.upsert_messages(messages, epoch=state.epoch)
                        e.store.refresh()
                        self.upserted += len(messages)
                        shown = kept(messages, written.stale_ids)
                        if shown:
                            self.events.publish_changes(MessagesChanged(self.account_id, upserted=tuple(shown)))
                        self.end_now = True
                finally:
                    self._release_quietly(inbox_lease)
        return e.state.save(lease, first_screen=True)

    def _fan_out(self, rows: AccountSyncState) -> None:
        """Start the pending folders (Inbox first), one job per mailbox slot; this invocation ends."""
        ordered = [r for r in policy.pending_order(all_rows(rows), self._store_generation(), self.e.clock())
                   if r.folder_id is not None]
        for row in ordered[: self.e.settings.graph_max_concurrency]:
            self._enqueue_continuation(row.folder_id, reason="start")
        if ordered:
            self.end_now = True


def _small_new_inbox(created: Sequence[Folder], page_size: int) -> bool:
    """Whether this round created the Inbox's row and the folder list counts one page or less in it: the
    row is new (never written, free), so the first pass after the round takes it (``policy.first_pass_fits``)."""
    inbox = next((folder for folder in created if folder.role == "inbox"), None)
    return inbox is not None and policy.fits_one_first_page(inbox.total_count, page_size)


def _info(folder: Folder) -> tuple[str, str | None, int | None, str | None, int | None, int | None]:
    """A folder's display fields, in the order a row's are compared in."""
    return (folder.name, folder.role, folder.total_count, folder.parent_id, folder.unread_count,
            folder.child_folder_count)


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
