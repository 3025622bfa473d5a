"""One folder's rounds: page the provider's change stream into the store, from the saved cursor.

See ``mailsync.sync.engine`` for the phases a folder's row moves through,
and ``mailsync.sync.pipeline`` for why pages are read ahead but the saved
cursor is always the newest link the provider issued.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from mailsync.errors import CursorExpired, LeaseLost, MailsyncError, NotFound, ProviderAuthError, ReauthRequired
from mailsync.models import Message, MessageBatch, MessagesChanged, SyncPhase
from mailsync.storage.sync_rows import Lease, SyncState
from mailsync.sync import policy
from mailsync.sync.invocation import (
    NOTIFIED_REASONS,
    RELOOK_COVERED,
    InvocationBase,
    Outcome,
    StopInvocation,
    kept,
)
from mailsync.sync.page_writes import PageWrites, page_ids
from mailsync.sync.pipeline import PageReader

log = logging.getLogger("mailsync.sync")

# Largest bulk the engine sends at once when pages pile up behind a slow store.
MAX_BULK_MESSAGES = 2_000
READ_AHEAD_PAGES = 2
# Writes of one folder's pages in flight at once (page_writes.py): a second keeps another of the
# node's write threads busy while the engine records the first and takes the next pages. A provider
# whose cursors expire gets fewer (``_page_round``: the read-ahead window).
WRITES_IN_FLIGHT = 2


class FolderSync(InvocationBase):
    """The folder half of an invocation."""

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
        # A large folder's first round is a bulk load: the store may refresh less often meanwhile
        # (a 3-5x cheaper index on a real engine); every way out of here ends it. A small folder's
        # is not: beginning and ending one costs more than it saves (policy.BULK_LOAD_MIN_MESSAGES).
        loading = (lease.state.rounds == 0 and policy.worth_a_bulk_load(lease.state)
                   and self._bulk_load(folder_id, begin=True))
        try:
            while held is not None:
                held = self._folder_round(held)
        except LeaseLost as lost:
            if lost.code == "folder_gone":
                # The folder was deleted while we paged it: undo whatever we wrote.
                e.store.remove_folder(self.account_id, folder_id)
            log.info("lease lost: %s", lost.message)
        except StopInvocation:
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
                raise StopInvocation(Outcome.DEFERRED)
            if isinstance(outcome, _OutOfTime):
                return None
            if isinstance(outcome, _Resync):
                resyncs += 1
                if resyncs > 2:
                    # 410 again on a fresh start: wait rather than spin.
                    self._defer(outcome.lease, policy.Wait(30.0, False, False, "cursor_expired"))
                    raise StopInvocation(Outcome.DEFERRED)
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
            claim = self._relook_with_finish(state)
            if claim is not None and claim != RELOOK_COVERED:
                final["relook_at"] = claim
            if self.one_round and self.slot is not None:
                # The round is this invocation's last Graph work: the slot goes back with the lease.
                finished, released = e.state.finish_and_release_slot(lease, self.slot, **final)
                if released is not None:
                    self.slot = None
                    self.released = released
            else:
                finished = e.state.finish(lease, **final)
        except MailsyncError as exc:
            if isinstance(exc, LeaseLost) or not policy.retryable(exc):
                raise
            # The final cursor is not saved: the continuation re-reads the last page.
            self._defer(lease, policy.wait_for(exc, attempt=policy.MAX_QUICK_RETRIES, failures=state.failures,
                                               time_left_s=0.0, rng=e.rng, cap_s=e.backoff_cap_s))
            raise StopInvocation(Outcome.DEFERRED) from exc
        self.relook_claim = claim
        self.rounds_done += 1
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

    def _relook_with_finish(self, state: SyncState) -> float | None:
        """A notified round's look-again, claimed in the finish's write instead of a merge of its own.

        The round is the invocation's only one and its last Graph work: whether it
        needs a look-again (``_folder_relook_delay``) is known once it read its pages.
        Its due time goes into the finish's fields (``relook_at``), unless the row as
        the round holds it shows one pending that covers it (due no more than a second
        before: ``SyncStateTable.schedule_relook``'s rule), which is ``RELOOK_COVERED``.
        None: decided after the run, as for every other invocation.
        """
        job = self.job
        if not self.one_round or state.folder_id is None or state.folder_id != job.folder_id \
                or job.reason not in NOTIFIED_REASONS:
            return None
        delay = self._relook_delay(state.folder_id)
        if delay is None:
            return None
        now = self.e.clock()
        at = now + delay
        if state.relook_at > now and state.relook_at >= at - 1.0:
            # Covered by a look-again already queued, unless the pending one is this invocation's own
            # claim from an earlier round's finish (a second round of the folder, run because it was
            # marked dirty meanwhile): that one is queued only after the run, so it stays the claim.
            # Read as covered, nobody would queue it: every other job's schedule_relook sees it pending.
            mine = self.relook_claim
            return mine if mine is not None and mine != RELOOK_COVERED else RELOOK_COVERED
        return at

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
        """Pages until the round completes, time runs out, or a fault.

        Pages are read ahead (``pipeline.PageReader``) and written with up to
        ``WRITES_IN_FLIGHT`` writes in flight (``page_writes.PageWrites``); a
        cursor is saved once its page and every page before it are written.
        Whatever way the round leaves, no write of it is still running.
        """
        e = self.e
        folder_id = lease.state.folder_id
        assert folder_id is not None
        held = _Held(lease)
        attempt = 0
        provider = self._provider_()
        # Outlook keeps only a folder's newest few delta links: reading far ahead of the saved one
        # could leave it expired (pipeline.py). An IMAP cursor is our own state and never expires.
        window = e.settings.delta_links_kept - 1 if provider.cursors_expire else None
        # Within a window, pages being written count as unsaved: more writes in flight than the window
        # leaves beside one request would stop the reader while they run. With Outlook's two, one write
        # and one request overlap (the request's latency is what matters there); IMAP gets two writes.
        depth = WRITES_IN_FLIGHT if window is None else max(1, min(WRITES_IN_FLIGHT, window - 1))
        while True:
            reader = PageReader(functools.partial(provider.message_changes, folder_id), held.lease.state.cursor or None,
                                depth=READ_AHEAD_PAGES, deadline=self.deadline, clock=e.clock, window=window)
            writes: PageWrites[_Applied] = PageWrites(
                functools.partial(self._store_pages, folder_id, held.lease.state.epoch), depth=depth)
            try:
                while True:
                    # Out of time: write what was read (never drop it and read it again, which
                    # would issue newer links than the saved one), then stop with the newest link.
                    out_of_time = self._time_left() <= 0
                    if len(writes) and reader.waits_for_a_save():
                        # Outlook's window is full of pages being written: the reader reads on
                        # once the oldest one's cursor is saved.
                        final = self._settle(held, writes, reader, every=False, wait=True)
                        if final is not None or held.lease.state.resync_requested:
                            return _RoundDone(held.lease, final or {})
                    try:
                        pages = reader.drain() if out_of_time else reader.take(MAX_BULK_MESSAGES)
                    except BaseException:
                        # A fault of the provider comes after the pages before it: those are written
                        # and their cursor saved first, so the retry starts from the failed request.
                        self._settle(held, writes, reader, every=True)
                        raise
                    if pages:
                        attempt = 0
                        ids = page_ids(pages)
                        overlap = writes.overlaps(pages, ids)
                        if overlap or writes.full:
                            # Room first: the oldest write, or every one when these pages name a
                            # message in flight (two writes of one message must not race).
                            final = self._settle(held, writes, reader, every=overlap, wait=True)
                            if final is not None or held.lease.state.resync_requested:
                                return _RoundDone(held.lease, final or {})
                        if e.before_write is not None:
                            e.before_write(folder_id, self.pages)
                        self._note_seen(folder_id, pages)
                        writes.start(pages, ids)
                    last = out_of_time or not pages or pages[-1].complete
                    # The answers already in are recorded now (one cursor save for all of them); at
                    # the end of what was read, every write in flight is waited for.
                    final = self._settle(held, writes, reader, every=last)
                    if final is not None:
                        return _RoundDone(held.lease, final)
                    if held.lease.state.resync_requested:
                        return _RoundDone(held.lease, {})
                    if last:
                        e.state.release(held.lease)
                        self._enqueue_continuation(folder_id, reason="time_budget")
                        self.end_now = True
                        return _OutOfTime()
            except CursorExpired:
                log.info("cursor expired: resync")
                return _Resync(held.lease)
            except (ProviderAuthError, ReauthRequired) as exc:
                self._release_quietly(held.lease)
                self._reauth(exc)
                raise StopInvocation(Outcome.REAUTH) from exc
            except NotFound:
                # The folder is gone at the provider (or never was): the folder list decides.
                delay = policy.backoff_seconds(held.lease.state.failures, e.rng, cap_s=e.backoff_cap_s)
                wait = policy.Wait(delay, False, False, "not_found")
                self._defer(held.lease, wait, requeue=False)
                self._enqueue_continuation(None, reason="folder_not_found")
                return _Deferred()
            except MailsyncError as exc:
                if isinstance(exc, LeaseLost):
                    raise
                if not policy.retryable(exc):
                    log.warning("folder failed: %s", exc.code, extra={"error": exc.message})
                    self._defer(held.lease, policy.wait_for(exc, attempt=policy.MAX_QUICK_RETRIES,
                                                            failures=held.lease.state.failures,
                                                            time_left_s=0.0, rng=e.rng, cap_s=e.backoff_cap_s))
                    return _Deferred()
                wait = policy.wait_for(exc, attempt=attempt, failures=held.lease.state.failures,
                                       time_left_s=self._time_left(), rng=e.rng, cap_s=e.backoff_cap_s)
                if not wait.in_place:
                    log.info("transient fault, back later: %s", exc.code, extra={"wait_s": round(wait.seconds, 2)})
                    self._defer(held.lease, wait)
                    return _Deferred()
                attempt += 1
                e.sleep(wait.seconds)
            finally:
                # Before the lease goes back or the next round starts: no write of ours may still run.
                writes.close()
                reader.close()

    def _settle(self, held: _Held, writes: PageWrites[_Applied], reader: PageReader, *, every: bool,
                wait: bool = False) -> dict[str, Any] | None:
        """Record the writes that have their answer, oldest first, and save the newest one's cursor.

        ``every``: wait for every write in flight; ``wait``: for the oldest at
        least (to make room). Returns the round's final fields when its last
        page was among them (saved by ``_complete_round``, not here).

        A write that failed stops the recording there: the writes behind it
        are waited for and dropped, and its pages and theirs are written
        again in one go with short faults retried in place (``_rewrite``),
        their cursor saved after that; a fault that is not retried in place
        propagates with nothing after the failed write saved.
        """
        done: list[tuple[list[MessageBatch], _Applied]] = []
        final: dict[str, Any] | None = None
        try:
            while len(writes) and (every or writes.oldest_done() or (wait and not done)):
                done.append(writes.pop())
        except BaseException as exc:
            failed = writes.last_failed
            rest = writes.abandon()
            if done:
                held.lease, final = self._record_pages(held.lease, done)
                reader.saved(sum(len(pages) for pages, _ in done))
            if not isinstance(exc, MailsyncError) or isinstance(exc, LeaseLost):
                raise
            held.lease, final = self._rewrite(held.lease, [*failed, *rest], exc)
            reader.saved(len(failed) + len(rest))
            return final
        if done:
            held.lease, final = self._record_pages(held.lease, done)
            reader.saved(sum(len(pages) for pages, _ in done))
        return final

    def _rewrite(self, lease: Lease, pages: list[MessageBatch], error: MailsyncError
                 ) -> tuple[Lease, dict[str, Any] | None]:
        """Pages whose write failed with ``error``: written again now, short store faults waited for in place."""
        if not policy.retryable(error):
            raise error
        wait = policy.wait_for(error, attempt=0, failures=0, time_left_s=self._time_left(), rng=self.e.rng,
                               cap_s=self.e.backoff_cap_s)
        if not wait.in_place:
            raise error
        log.info("page write failed, writing again: %s", error.code, extra={"pages": len(pages)})
        self.e.sleep(wait.seconds)
        return self._write_pages(lease, pages, attempt=1)

    def _write_pages(self, lease: Lease, pages: list[MessageBatch], *, attempt: int = 0
                     ) -> tuple[Lease, dict[str, Any] | None]:
        """``_apply_pages`` with short store faults retried in place: the pages were read, and reading
        them again would issue newer delta links than the one saved (see pipeline.py)."""
        return self._retrying(lambda: self._apply_pages(lease, pages), attempt=attempt)

    def _apply_pages(self, lease: Lease, pages: list[MessageBatch]) -> tuple[Lease, dict[str, Any] | None]:
        """Write the pages' changes, then record them (``_record_pages``), on this thread."""
        folder_id = lease.state.folder_id
        assert folder_id is not None
        return self._record_pages(lease, [(pages, self._store_pages(folder_id, lease.state.epoch, pages))])

    def _note_seen(self, folder_id: str, pages: list[MessageBatch]) -> None:
        """What a notified round read of its folder (``Expected``), in stream order: the last word on an id wins."""
        if self.expected is None or folder_id != self.job.folder_id:
            return
        for page in pages:
            for message in page.upserts:
                self.seen[message.message_id] = page.versions.get(message.message_id, "")
            for message_id in page.removals:
                self.seen[message_id] = None

    def _store_pages(self, folder_id: str, epoch: int, pages: list[MessageBatch]) -> _Applied:
        """Write the pages' changes to the store (last one wins per id); on a writer thread or the engine's.

        Touches no state of the invocation: ``_record_pages`` does, on the
        engine thread, once the write is acknowledged.
        """
        store = self.e.store
        changes: dict[str, Message | None] = {}
        for page in pages:
            for message in page.upserts:
                changes[message.message_id] = message
            for message_id in page.removals:
                changes[message_id] = None
        upserts = [m for m in changes.values() if m is not None]
        removals = [mid for mid, m in changes.items() if m is None]
        shown = upserts
        if upserts:
            result = store.upsert_messages(upserts, epoch=epoch)
            if result.failed_ids:
                log.warning("%d message(s) dead-lettered by the store", len(result.failed_ids))
            shown = kept(upserts, result.stale_ids)
        if removals:
            store.remove_messages(self.account_id, folder_id, removals)
        return _Applied(len(upserts), len(removals), tuple(shown), tuple(removals))

    def _record_pages(self, lease: Lease, written: list[tuple[list[MessageBatch], _Applied]]
                      ) -> tuple[Lease, dict[str, Any] | None]:
        """Pages whose writes are acknowledged, oldest first: count them, save the newest cursor, publish.

        One cursor save for all of them (a page's save is a table write). On
        the round's last page the cursor and counts are *returned* instead
        of saved: ``_complete_round`` saves them after ``remove_stale``, or a
        crash in between would leave the folder "complete" with stale documents.
        """
        e = self.e
        state = lease.state
        folder_id = state.folder_id
        assert folder_id is not None
        full = state.phase != SyncPhase.INCREMENTAL
        upserted = sum(applied.upserted for _, applied in written)
        removed = sum(applied.removed for _, applied in written)
        last = written[-1][0][-1]
        fields: dict[str, Any] = {"cursor": last.cursor, "failures": 0}
        if full:
            fields["indexed"] = state.indexed + upserted
        else:
            fields["removed"] = state.removed + removed
        final: dict[str, Any] | None = None
        if last.complete:
            final = fields
            live = replace(state, **{k: v for k, v in fields.items() if k != "cursor"})
        else:
            current = lease
            lease = self._retrying(lambda: e.state.save(current, **fields))
            live = lease.state
        self.pages += sum(len(pages) for pages, _ in written)
        self.upserted += upserted
        self.removed_count += removed
        for _, applied in written:
            if applied.upserted or applied.removed:
                self.changed.add(folder_id)
                self.events.publish_changes(MessagesChanged(
                    self.account_id, upserted=applied.shown,
                    removed=tuple((folder_id, mid) for mid in applied.removals)))
                if not full:
                    self.followed = True
        self._publish_progress(folder_id, state.phase.value, None, live=live)
        return lease, final


@dataclass
class _Held:
    """The round's lease as last written: every save renews it, whichever helper made the save."""

    lease: Lease


@dataclass(frozen=True)
class _Applied:
    """What one write of pages did at the store (for ``_record_pages``)."""

    upserted: int
    removed: int
    shown: tuple[Message, ...]       # the upserts the store kept (not refused as older)
    removals: tuple[str, ...]


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


def _full_reason(state: SyncState, generation: str) -> str:
    if state.resync_requested:
        return "requested"
    if state.generation and state.generation != generation:
        return "store_generation"
    return "initial" if state.rounds == 0 else "cursor_lost"
