"""The worker half of the client actions: an ACTION job applied at the provider, then confirmed or undone.

Per outcome (``ActionWorker.run_job``):

* done: the row stays (the next delta round confirms it, see versions.py);
  an IMAP move replaces the row under the id the target folder gave it;
  the page gets a ``messagesChanged`` with the row as the store has it.
* throttled / unavailable: the unfinished actions go back on the queue
  after the provider's Retry-After (up to ``MAX_ATTEMPTS``).
* any other failure (or attempts used up): the row goes back to the
  provider's truth (read now; removed if the message is gone) at a version
  above the optimistic one, and the page gets the row and an
  ``actionsFailed`` notice.

Before it applies anything the job drops every field a newer action of the
user's claimed (mailsync.actions.ordering), and after it re-asserts a field
a newer action claimed meanwhile.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from mailsync.actions.action_jobs import ActionJobs
from mailsync.actions.job_payload import Planned, decode_actions
from mailsync.actions.models import FLAG, PLACE, READ, ActionOutcome, MessageAction
from mailsync.actions.ordering import current_part, reassertion
from mailsync.actions.row_writes import RowWrites, SideTask
from mailsync.actions.versions import revert_version, uses_clock
from mailsync.errors import MailsyncError, NotFound, ProviderError, ProviderThrottled, ProviderUnavailable
from mailsync.models import Account, Job, Message, MessagesChanged, Provider
from mailsync.ports import (
    AccountRepository,
    ActionLedger,
    EventPublisher,
    MessageActionsFactory,
    MessageStore,
    RequestSlots,
)

log = logging.getLogger("mailsync.actions")

MAX_ATTEMPTS = 8


class ActionWorker:
    """Runs ACTION jobs (see the module docstring); built by ``MessageActionService``, which shares its parts."""

    def __init__(self, accounts: AccountRepository, store: Callable[[], MessageStore], actions: MessageActionsFactory,
                 ledger: Callable[[], ActionLedger], rows: RowWrites, jobs: ActionJobs, side_task: SideTask, *,
                 clock: Callable[[], float] = time.time,
                 observe: Callable[[MessageAction, str], None] | None = None,
                 slots: Callable[[], RequestSlots] | None = None, max_slots: int = 4) -> None:
        self._accounts = accounts
        self._store = store
        self._actions = actions
        self._ledger = ledger
        self._rows = rows
        self._jobs = jobs
        self._side_task = side_task
        self._clock = clock
        self._observe = observe or (lambda action, fate: None)
        # A job whose batches fill the mailbox's concurrent requests holds the free slots while it runs, so the
        # sync rounds its own changes trigger wait instead of taking the slots its items need (429s).
        self._slots = slots
        self._max_slots = max_slots

    def run_job(self, job: Job, events: EventPublisher) -> None:
        """Carry out an ACTION job (see the module docstring); never raises for a provider's refusal."""
        batch_id = job.attrs.get("batch")
        if batch_id:
            text = self._ledger().get_batch(job.account_id, batch_id)
            if text is None:
                return                              # finished by an earlier delivery of this job
        else:
            text = job.attrs.get("actions", "")
        planned = decode_actions(text)
        attempt = int(job.attrs.get("attempt", "0") or 0)
        account = self._accounts.get(job.account_id)
        if account is not None:
            if job.attrs.get("restore"):
                self._run_restore(account, planned, attempt, events)
            else:
                self._run(account, planned, attempt, events)
        if batch_id:
            # Only now: a worker dying before this leaves the list for the redelivery (retries have their own).
            self._ledger().drop_batch(job.account_id, batch_id)

    def _run(self, account: Account, planned: Sequence[Planned], attempt: int, events: EventPublisher) -> None:
        # The ledger read (what a newer action superseded) and a bulk job's request slots side by side: they
        # need nothing from each other, and both come before the first batch.
        slots = self._side_task(self._take_slots, account, len(planned))
        try:
            planned = self._still_current(account, planned)
        except BaseException:
            self._give_back(_held(slots))
            raise
        held = slots.result()
        if len(planned) <= self._max_slots:
            self._give_back(held)       # superseded down to what one batch at a time sends
            held = []
        if not planned:
            return
        try:
            provider = self._actions.open_actions(account)
        except BaseException:
            self._give_back(held)
            raise
        try:
            try:
                # As many chained batches at once as the mailbox slots it holds (mailsync.providers.graph_actions).
                outcomes = provider.apply([p.action for p in planned], parallel=max(1, len(held)))
            except (ProviderThrottled, ProviderUnavailable) as exc:
                outcomes = None
                self._retry_or_fail(account, planned, attempt, exc, provider, events)
            if outcomes is None:
                return
            retry: list[Planned] = []
            failed: list[tuple[Planned, MailsyncError]] = []
            applied: list[Planned] = []
            changed = MessagesChanged(account_id=account.account_id)
            store = self._store()
            # The rows as stored now, in one multi-get: a read each made a bulk job of 500 pay 500 round trips.
            stored = store.get_messages(account.account_id, [p.action.message_id for p, o in
                                                             zip(planned, outcomes, strict=True)
                                                             if o.done and p.row is not None])
            for p, outcome in zip(planned, outcomes, strict=True):
                if outcome.done:
                    self._observe(p.action, "done")
                    applied.append(p)
                    changed = _merge(changed, self._confirm(account, p, outcome, stored.get(p.action.message_id),
                                                            store))
                elif isinstance(outcome.error, (ProviderThrottled, ProviderUnavailable)):
                    retry.append(p)
                else:
                    failed.append((p, outcome.error or ProviderError("the provider refused the action")))
            if applied:
                self._reassert(account, applied, provider, events)
            if retry:
                error = next(o.error for p, o in zip(planned, outcomes, strict=True) if p in retry)
                assert error is not None
                self._retry_or_fail(account, retry, attempt, error, provider, events)
            if failed:
                self._revert(account, failed, provider, events)
            events.publish_changes(changed)
        finally:
            provider.close()
            self._give_back(held)

    def _run_restore(self, account: Account, planned: Sequence[Planned], attempt: int,
                     events: EventPublisher) -> None:
        """A restore job: failed actions whose rows ``_restore`` could not put back yet."""
        provider = self._actions.open_actions(account)
        try:
            self._restore(account, planned, provider, events, attempt=attempt)
        finally:
            provider.close()

    def _take_slots(self, account: Account, actions: int) -> list[Any]:
        """The free ones of the mailbox's request slots, for a job that fills them (Graph runs 4 items of a
        batch at once). Never waits for one: a user's action is not queued behind an initial sync."""
        if self._slots is None or account.provider is not Provider.OUTLOOK or actions <= self._max_slots:
            return []
        # Its own delivery token per slot: the table hands a slot back to a token it already knows.
        return list(self._slots().acquire_slots(account.account_id,
                                                [f"action-{uuid.uuid4().hex}#0" for _ in range(self._max_slots)],
                                                self._max_slots))

    def _give_back(self, held: Sequence[Any]) -> None:
        if held and self._slots is not None:
            table = self._slots()
            for slot in held:
                table.release_slot(slot)

    def _still_current(self, account: Account, planned: Sequence[Planned]) -> list[Planned]:
        """The job's actions less every field a newer action of the user's claimed (mailsync.actions.ordering).

        An action left with nothing is done: the newer action's job writes what the user last asked for.
        """
        latest = self._ledger().latest(account.account_id, [p.action.message_id for p in planned])
        current: list[Planned] = []
        for p in planned:
            part = current_part(p.action, p.seq, latest.get(p.action.message_id))
            if part is None:
                log.info("action superseded by a newer one on the same message",
                         extra={"account_id": account.account_id})
                self._observe(p.action, "done")
            else:
                current.append(replace(p, action=part))
        return current

    def _reassert(self, account: Account, applied: Sequence[Planned], provider: Any,
                  events: EventPublisher) -> None:
        """A newer action claimed a field this job just wrote: its write may have landed first, so the
        newest value is written again (mailsync.actions.ordering). Throttled: queued under the newer number."""
        latest = self._ledger().latest(account.account_id, [p.action.message_id for p in applied])
        graph = account.provider is Provider.OUTLOOK
        again: list[Planned] = []
        for p in applied:
            entry = latest.get(p.action.message_id)
            action = reassertion(p.action, p.seq, entry, ids_follow_moves=graph)
            if action is not None and entry is not None:
                again.append(Planned(action=action, row=p.row, version=p.version, seq=entry.seq))
        if not again:
            return
        try:
            outcomes = provider.apply([p.action for p in again])
        except (ProviderThrottled, ProviderUnavailable) as exc:
            self._retry_or_fail(account, again, 0, exc, provider, events)
            return
        retry = [p for p, o in zip(again, outcomes, strict=True)
                 if isinstance(o.error, (ProviderThrottled, ProviderUnavailable))]
        if retry:
            error = next(o.error for o in outcomes if isinstance(o.error, (ProviderThrottled, ProviderUnavailable)))
            assert error is not None
            self._retry_or_fail(account, retry, 0, error, provider, events)
        for o in outcomes:
            if not o.done and o.error is not None and not isinstance(o.error, (ProviderThrottled,
                                                                               ProviderUnavailable)):
                # The newer action's own job meets the same refusal and reports it.
                log.info("re-asserting a newer action failed: %s", o.error.message,
                         extra={"account_id": account.account_id, "error_code": o.error.code})

    def _confirm(self, account: Account, p: Planned, outcome: ActionOutcome, current: Message | None,
                 store: MessageStore) -> MessagesChanged:
        """The provider has it: the row (``current``, as stored) stays; an IMAP move takes the target's id (or
        waits for its round)."""
        account_id = account.account_id
        new_id = outcome.message_id
        if p.row is None:
            return MessagesChanged(account_id=account_id, removed=((p.action.folder_id, p.action.message_id),))
        if outcome.absent:
            # A delete into the trash of a message the provider no longer had (the other client purged it, or
            # deleted its folder with it, before the page caught up): "done", but the optimistic row in the trash
            # is one no round will ever list or remove (the trash's stream never had it), so it goes now.
            store.remove_messages(account_id, p.row.folder_id, [p.action.message_id])
            return MessagesChanged(account_id=account_id, removed=((p.row.folder_id, p.action.message_id),))
        if new_id is None and (p.action.delete or p.action.destination) and account.provider is Provider.IMAP:
            # Moved (or trashed) without a COPYUID answer: the target folder's round brings it under its new id.
            store.remove_messages(account_id, p.row.folder_id, [p.action.message_id])
            return MessagesChanged(account_id=account_id, removed=((p.row.folder_id, p.action.message_id),))
        if new_id is not None and new_id != p.action.message_id and current is not None:
            # IMAP ids name folder and UID: the moved message is a new document. Version 0: the target
            # folder's round (MODSEQ or clock) overwrites it with what the server says.
            moved = replace(current, message_id=new_id, folder_id=p.row.folder_id, version=0)
            self._rows.write_rows(account_id, [moved])
            store.remove_messages(account_id, p.row.folder_id, [p.action.message_id])
            return MessagesChanged(account_id=account_id, upserted=(moved,),
                                   removed=((p.row.folder_id, p.action.message_id),))
        return MessagesChanged(account_id=account_id, upserted=(current,) if current is not None else ())

    def _retry_or_fail(self, account: Account, planned: Sequence[Planned], attempt: int, error: MailsyncError,
                       provider: Any, events: EventPublisher) -> None:
        if attempt + 1 >= MAX_ATTEMPTS:
            self._revert(account, [(p, error) for p in planned], provider, events)
            return
        for p in planned:
            self._observe(p.action, "retry")
        delay = max(1.0, float(getattr(error, "retry_after_s", None) or 2 ** attempt))
        self._jobs.enqueue(account.account_id, planned, attempt=attempt + 1, reason="user action (retry)",
                           delay_s=min(delay, 300.0))

    def _revert(self, account: Account, failed: Sequence[tuple[Planned, MailsyncError]], provider: Any,
                events: EventPublisher) -> None:
        """Definitive failure: the rows go back to what the provider has, and the page is told."""
        account_id = account.account_id
        for p, error in failed:
            self._observe(p.action, "failed")
            log.warning("action failed for good: %s", error.message,
                        extra={"account_id": account_id, "error_code": error.code})
        self._restore(account, [p for p, _ in failed], provider, events, attempt=0)
        notify = getattr(events, "publish_action_failures", None)
        if notify is not None:
            notify(account_id, [{"message_id": p.action.message_id, "code": e.code, "message": e.message}
                                for p, e in failed])

    def _restore(self, account: Account, planned: Sequence[Planned], provider: Any, events: EventPublisher, *,
                 attempt: int) -> None:
        """The rows of failed actions back to the provider's truth, read now (removed if the message is gone).

        A message the provider cannot be asked about now (a dropped connection, a NO, a 429) is asked again
        later by a restore job, not left as it is: its optimistic row says what never happened, and no delta
        round corrects a message that did not change at the provider. On IMAP the row of a failed move even
        sits in a folder that is not the message's, and the removal of that folder (the very reason a move
        fails) then deleted it from the store for good (the IMAP convergence test's every-fault scenario).
        """
        store = self._store()
        account_id = account.account_id
        now_ms = int(self._clock() * 1000)
        upserted: list[Message] = []
        removed: list[tuple[str, str]] = []
        unread: list[Planned] = []
        latest = self._ledger().latest(account_id, [p.action.message_id for p in planned])
        for p in planned:
            where = p.row.folder_id if p.row is not None else p.action.folder_id
            # The store first, then the provider: a row absent before the provider still had the message
            # was removed with the optimistic row's folder (or never written), and must beat that removal's
            # tombstone; one present then must not beat the tombstone of a removal that lands meanwhile
            # (``revert_version``).
            stored = store.get_message(account_id, p.action.message_id)
            try:
                truth = provider.read_message(p.action.folder_id, p.action.message_id).message
            except NotFound:
                truth = None
            except MailsyncError as exc:
                log.info("cannot read the provider's copy to undo a failed action now: %s", exc.code,
                         extra={"account_id": account_id, "error_code": exc.code})
                unread.append(p)
                continue
            if truth is None:
                store.remove_messages(account_id, where, [p.action.message_id])
                removed.append((where, p.action.message_id))
                continue
            base = stored or truth
            clock = uses_clock(account.provider is Provider.OUTLOOK, p.version)
            # A field a newer action claimed keeps the stored (that action's optimistic) value: its job
            # confirms or reverts it.
            entry = latest.get(p.action.message_id)
            keep = {name for name in (READ, FLAG, PLACE) if entry is not None and entry.seq_of(name) > p.seq}
            row = replace(base, is_read=base.is_read if READ in keep else truth.is_read,
                          flag_status=base.flag_status if FLAG in keep else truth.flag_status,
                          folder_id=base.folder_id if PLACE in keep else truth.folder_id,
                          version=revert_version(p.version, now_ms, clock=clock, truth=truth.version,
                                                 absent=stored is None))
            # The folder's epoch, like the optimistic row: a resync of it may have passed the message already
            # (its write refused by our newer row), and would delete one written in no epoch as unseen.
            self._rows.write_rows(account_id, [row])
            if stored is not None and stored.folder_id != row.folder_id:
                removed.append((stored.folder_id, stored.message_id))
            upserted.append(row)
        if upserted or removed:
            events.publish_changes(MessagesChanged(account_id=account_id, upserted=tuple(upserted),
                                                   removed=tuple(removed)))
        if not unread:
            return
        if attempt + 1 >= MAX_ATTEMPTS:
            log.error("gave up undoing %d failed action(s): the provider could not be read", len(unread),
                      extra={"account_id": account_id})
            return
        self._jobs.enqueue(account_id, unread, attempt=attempt + 1, reason="user action (restore)",
                           delay_s=min(float(2 ** attempt), 300.0), restore=True)


def _held(slots: Future[list[Any]]) -> list[Any]:
    """The slots ``_take_slots`` took, when the job cannot use them (the ledger read failed): none if taking
    them failed too (that error is not the one the job fails with)."""
    try:
        return slots.result()
    except Exception:
        return []


def _merge(a: MessagesChanged, b: MessagesChanged) -> MessagesChanged:
    return MessagesChanged(account_id=a.account_id, upserted=a.upserted + b.upserted, removed=a.removed + b.removed)
