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
from mailsync.sync.pipeline import PageReader

log = logging.getLogger("mailsync.sync")

# Largest bulk the engine sends at once when pages pile up behind a slow store.
MAX_BULK_MESSAGES = 2_000
READ_AHEAD_PAGES = 2


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
            return RELOOK_COVERED
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
                raise StopInvocation(Outcome.REAUTH) from exc
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
                    self._defer(lease, policy.wait_for(exc, attempt=policy.MAX_QUICK_RETRIES,
                                                       failures=lease.state.failures,
                                                       time_left_s=0.0, rng=e.rng, cap_s=e.backoff_cap_s))
                    return _Deferred()
                wait = policy.wait_for(exc, attempt=attempt, failures=lease.state.failures,
                                       time_left_s=self._time_left(), rng=e.rng, cap_s=e.backoff_cap_s)
                if not wait.in_place:
                    log.info("transient fault, back later: %s", exc.code, extra={"wait_s": round(wait.seconds, 2)})
                    self._defer(lease, wait)
                    return _Deferred()
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
            shown = kept(upserts, result.stale_ids)
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
