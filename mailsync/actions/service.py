"""The client half's use cases: read a message whole, act on messages optimistically.

HTTP side (``functions/message_api``), account-scoped like the read API
(bearer checked first, then the store's account-scoped reads):

* ``read_message`` / ``read_attachment``: the store row says which folder
  the message is in; the body and attachments come from the provider now.
* ``update`` / ``delete`` / ``bulk``: validate, write the row as it will
  look into the store at once (the optimistic row, at the version
  ``mailsync.actions.versions`` picks), enqueue an ``ACTION`` job carrying
  the provider-side action and answer 202 with the rows. The job on the
  queue *is* the pending marker: it is durable, it is retried, and it
  carries what is needed to undo the row (the folder it was in, the
  optimistic version).

Each accepted action is numbered in the action ledger first (per message,
higher than every earlier action on it); the job carries the number and
leaves alone whatever a newer action set (``mailsync.actions.ordering``).

Worker side (``run_job``, a ``JobKind.ACTION`` handler): apply the actions
through ``MessageActions`` (Graph ``$batch``, IMAP one STORE per change),
then per outcome:

* done: the row stays (the next delta round confirms it, see versions.py);
  an IMAP move replaces the row under the id the target folder gave it;
  the page gets a ``messagesChanged`` with the row as the store has it.
* throttled / unavailable: the unfinished actions go back on the queue
  after the provider's Retry-After (up to ``MAX_ATTEMPTS``).
* any other failure (or attempts used up): the row goes back to the
  provider's truth (read now; removed if the message is gone) at a version
  above the optimistic one, and the page gets the row and an
  ``actionsFailed`` notice.

Idempotent under retry: a repeated PATCH writes the same row and sends
the provider a no-op; a move to the folder the row already says is no
action at all; deleting what is gone is done.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, TypeVar

from mailsync.actions.job_payload import Planned, decode_actions, encode_actions
from mailsync.actions.models import FLAG, PLACE, READ, ActionOutcome, AttachmentContent, Claimed, MessageAction
from mailsync.actions.ordering import claim_of, current_part, reassertion
from mailsync.actions.requests import MAX_ID_CHARS, Change, message_id_of, parse_change, parse_permanent
from mailsync.actions.sanitise import sanitise_html
from mailsync.actions.versions import optimistic_version, revert_version, uses_clock
from mailsync.errors import (
    InputError,
    MailsyncError,
    NotFound,
    ProviderError,
    ProviderThrottled,
    ProviderUnavailable,
)
from mailsync.jobs import MAX_JOB_BYTES, JobKind, new_job
from mailsync.linking.access import AccountAccess
from mailsync.models import Account, Address, FlagStatus, Job, Message, MessagesChanged, Provider
from mailsync.ports import (
    AccountRepository,
    ActionLedger,
    EventPublisher,
    JobQueue,
    MessageActionsFactory,
    MessageStore,
    RequestSlots,
)
from mailsync.realtime.signalr_messages import message_row

log = logging.getLogger("mailsync.actions")

MAX_BULK = 500
MAX_ATTEMPTS = 8
# The actions travel as a JSON string inside the job's JSON: every quote is escaped, so half the size.
_JOB_BUDGET = (MAX_JOB_BYTES - 1500) // 2
_Parsed = TypeVar("_Parsed")


def _address_json(address: Address | None) -> dict[str, str] | None:
    return {"name": address.name, "address": address.address} if address else None


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


class ActionsRouter:
    """``MessageActionsFactory`` dispatching on ``account.provider``."""

    def __init__(self, factories: Mapping[Provider, MessageActionsFactory]) -> None:
        self._factories = dict(factories)

    def open_actions(self, account: Account) -> Any:
        factory = self._factories.get(account.provider)
        if factory is None:
            raise NotFound(f"no {account.provider.value!r} provider is configured in this deployment")
        return factory.open_actions(account)


class MessageActionService:
    """Read one message whole; change messages optimistically, then at the provider (see the module docstring)."""

    def __init__(self, access: AccountAccess, accounts: AccountRepository, store: Callable[[], MessageStore],
                 actions: MessageActionsFactory, queue: Callable[[], JobQueue], *,
                 ledger: Callable[[], ActionLedger], epochs: Callable[[str, Sequence[str]], Mapping[str, int]],
                 max_attachment_bytes: int = 25 * 1024 * 1024, clock: Callable[[], float] = time.time,
                 observe: Callable[[MessageAction, str], None] | None = None,
                 slots: Callable[[], RequestSlots] | None = None, max_slots: int = 4) -> None:
        self._access = access
        self._accounts = accounts
        self._store = store
        self._actions = actions
        self._queue = queue
        # Per message, the latest accepted action on each field: a job older than it leaves it be
        # (mailsync.actions.ordering).
        self._ledger = ledger
        self._max_attachment_bytes = max_attachment_bytes
        self._clock = clock
        # Told each action's fate: "queued" (accepted), then "retry" (back on the queue) any number of
        # times, then "done" or "failed" (undone) exactly once. For metrics and the convergence test.
        self._observe = observe or (lambda action, fate: None)
        # The folders' current sync epochs (SyncStateTable.epochs): every row written here (optimistic,
        # reverted, an IMAP move's new document) carries its folder's, or a resync of that folder that
        # has passed the message already deletes it as unseen (docs/store.md). Required: a wiring that
        # left it out wrote every row in epoch 0 (the convergence test's did).
        self._epochs = epochs
        # A job whose batches fill the mailbox's concurrent requests holds the free slots while it runs, so the
        # sync rounds its own changes trigger wait instead of taking the slots its items need (429s).
        self._slots = slots
        self._max_slots = max_slots
        # For the calls an action makes side by side (_authenticated_row, _commit, _run); shared by the host's
        # threads. Its tasks never wait for one another (a full pool only queues them): all are I/O.
        self._side = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mailsync-actions")

    # --- reading ----------------------------------------------------------------------------------

    def _row(self, account: Account, message_id: str) -> Message:
        return self._stored_row(account.account_id, message_id)

    def _stored_row(self, account_id: str, message_id: str) -> Message:
        row = self._store().get_message(account_id, message_id_of(message_id))
        if row is None:
            raise NotFound("no such message")
        return row

    def _side_task(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """``call`` on the service's side pool, in a copy of this thread's context (log fields)."""
        return self._side.submit(contextvars.copy_context().run, call, *args, **kwargs)

    def _authenticated_row(self, account_id: str, bearer: str | None, message_id: str,
                           parse: Callable[[], _Parsed]) -> tuple[Account, _Parsed, Message]:
        """The account the bearer opens and the message's row, read side by side (one round trip less before
        the 202: the account is a table read, the row a store read).

        The row is read under the account id the request names, before the bearer is known to open it, and
        is used only once it does: a request refused 401 or 404 costs one store read more, and learns
        nothing of it. The errors keep their order: the account's 401/404, then ``parse``'s 400 (the request
        body's), then the row's."""
        row = self._side_task(self._stored_row, account_id, message_id)
        try:
            account = self._access.authenticate(account_id, bearer)
            parsed = parse()
        except BaseException:
            row.cancel()
            raise
        return account, parsed, row.result()

    def read_message(self, account_id: str, bearer: str | None, message_id: str) -> dict[str, Any]:
        """The whole message: headers, flags, the body (HTML sanitised, or text) and the attachment list."""
        account = self._access.authenticate(account_id, bearer)
        row = self._row(account, message_id)
        provider = self._actions.open_actions(account)
        try:
            content = provider.read_message(row.folder_id, row.message_id)
        finally:
            provider.close()
        message = content.message
        attachments = [{
            "attachment_id": a.attachment_id, "name": a.name, "content_type": a.content_type, "size": a.size,
            "is_inline": a.is_inline, "content_id": a.content_id,
        } for a in content.attachments]
        body: dict[str, Any] = {"content_type": content.body_type}
        if content.body_type == "html":
            body["html"] = sanitise_html(content.body)
        else:
            body["text"] = content.body
        return {
            **message_row(row),
            # The provider's word on what it has now (the row may be an optimistic one still pending).
            "is_read": message.is_read,
            "flag_status": message.flag_status.value,
            "from": _address_json(message.sender),
            "to": [_address_json(a) for a in message.to],
            "cc": [_address_json(a) for a in message.cc],
            "reply_to": [_address_json(a) for a in content.reply_to],
            "sent_at": _iso(message.sent_at),
            "received_at": _iso(message.received_at or row.received_at),
            "categories": list(message.categories),
            "conversation_id": message.conversation_id,
            "internet_message_id": message.internet_message_id,
            "body": body,
            "attachments": attachments,
        }

    def read_attachment(self, account_id: str, bearer: str | None, message_id: str,
                        attachment_id: str) -> AttachmentContent:
        account = self._access.authenticate(account_id, bearer)
        if not attachment_id or len(attachment_id) > MAX_ID_CHARS or not attachment_id.isprintable():
            raise InputError("attachment id must be a non-empty printable string", code="invalid_attachment_id")
        row = self._row(account, message_id)
        provider = self._actions.open_actions(account)
        try:
            return provider.read_attachment(row.folder_id, row.message_id, attachment_id,
                                            max_bytes=self._max_attachment_bytes)
        finally:
            provider.close()

    # --- acting -------------------------------------------------------------------------------------

    def update(self, account_id: str, bearer: str | None, message_id: str, body: Any,
               events: EventPublisher | None = None, jobs: JobQueue | None = None) -> dict[str, Any]:
        """PATCH: the optimistic row into the store and onto ``events`` (the page's live channel), the job queued
        (on ``jobs`` when given: the function's ``mailsync.jobs.WakingJobQueue``, which also wakes the host's
        queue listener)."""
        account, change, row = self._authenticated_row(account_id, bearer, message_id, lambda: parse_change(body))
        planned = self._plan(account, [row], change=change)
        self._commit(account, planned, events, jobs)
        return {"message": message_row(planned[0].row) if planned and planned[0].row else message_row(row),
                "pending": bool(planned)}

    def delete(self, account_id: str, bearer: str | None, message_id: str, permanent_raw: str | None,
               events: EventPublisher | None = None, jobs: JobQueue | None = None) -> dict[str, Any]:
        """DELETE: to the trash (the moved row) or for good (a removal), published and queued like ``update``."""
        account, permanent, row = self._authenticated_row(account_id, bearer, message_id,
                                                          lambda: parse_permanent(permanent_raw))
        planned = self._plan(account, [row], delete=True, permanent=permanent)
        self._commit(account, planned, events, jobs)
        moved = planned[0].row if planned else None
        return {"message": message_row(moved) if moved else None, "removed": moved is None, "pending": True}

    def bulk(self, account_id: str, bearer: str | None, body: Any,
             events: EventPublisher | None = None, jobs: JobQueue | None = None) -> dict[str, Any]:
        """``{"message_ids": [...], "action": {PATCH fields} | {"delete": true, "permanent": bool}}``.

        The optimistic rows go onto ``events`` as one ``messagesChanged`` (capped like the worker's).
        """
        account = self._access.authenticate(account_id, bearer)
        if not isinstance(body, dict) or set(body) - {"message_ids", "action"}:
            raise InputError("the body must be {\"message_ids\": [...], \"action\": {...}}", code="invalid_request")
        ids = body.get("message_ids")
        if not isinstance(ids, list) or not ids:
            raise InputError("message_ids must be a non-empty list", code="invalid_field")
        if len(ids) > MAX_BULK:
            raise InputError(f"at most {MAX_BULK} message ids at once", code="too_many_messages")
        ids = list(dict.fromkeys(message_id_of(i) for i in ids))
        action = body.get("action")
        delete = isinstance(action, dict) and action.get("delete") is True
        if delete:
            assert isinstance(action, dict)
            if set(action) - {"delete", "permanent"} or not isinstance(action.get("permanent", False), bool):
                raise InputError("a delete action is {\"delete\": true, \"permanent\": bool}", code="invalid_field")
            change = None
        else:
            change = parse_change(action)
        found = self._store().get_messages(account.account_id, ids)
        rows = [found[i] for i in ids if i in found]
        missing = [i for i in ids if i not in found]
        if delete:
            assert isinstance(action, dict)
            planned = self._plan(account, rows, delete=True, permanent=bool(action.get("permanent", False)))
        else:
            planned = self._plan(account, rows, change=change)
        self._commit(account, planned, events, jobs)
        return {"accepted": len(rows), "not_found": missing,
                "messages": [message_row(p.row) for p in planned if p.row is not None],
                "removed": [{"message_id": p.action.message_id, "folder_id": p.action.folder_id}
                            for p in planned if p.row is None]}

    def _plan(self, account: Account, rows: Sequence[Message], *, change: Change | None = None,
              delete: bool = False, permanent: bool = False) -> list[Planned]:
        trash: str | None = None
        if delete or (change is not None and change.folder_id is not None):
            # Only a move or a delete needs the folder list (list_folders also counts every folder's
            # messages: the slowest read of a PATCH that only marks read).
            folders = {v.folder.folder_id: v.folder for v in self._store().list_folders(account.account_id)}
            trash = next((f.folder_id for f in folders.values() if f.role == "deleteditems"), None)
            if change is not None and change.folder_id is not None and change.folder_id not in folders:
                raise InputError("folder_id is not a folder of this account", code="unknown_folder")
        now_ms = int(self._clock() * 1000)
        graph = account.provider is Provider.OUTLOOK
        planned: list[Planned] = []
        for row in rows:
            clock = uses_clock(graph, row.version)
            version = optimistic_version(row.version, now_ms, clock=clock)
            if delete:
                to_trash = not permanent and trash is not None and row.folder_id != trash
                action = MessageAction(row.message_id, row.folder_id, delete=True, permanent=not to_trash)
                optimistic = replace(row, folder_id=trash, version=version) if to_trash and trash else None
                planned.append(Planned(action=action, row=optimistic, version=version, before=row))
                continue
            assert change is not None
            flag = change.flag_status
            if flag is FlagStatus.COMPLETE and not graph:
                flag = FlagStatus.NOT_FLAGGED      # IMAP has no "complete": it is \Flagged removed
            # Only what changes: a value the row has already is no action (and no version bump, which
            # would leave the row ahead of a provider that had nothing to do).
            destination = change.folder_id if change.folder_id not in (None, row.folder_id) else None
            is_read = change.is_read if change.is_read != row.is_read else None
            if flag is not None and flag == row.flag_status:
                flag = None
            if is_read is None and flag is None and destination is None:
                continue                           # a move to where it is: nothing to do
            action = MessageAction(row.message_id, row.folder_id, is_read=is_read, flag_status=flag,
                                   destination=destination)
            optimistic = replace(row, version=version,
                                 is_read=row.is_read if is_read is None else is_read,
                                 flag_status=row.flag_status if flag is None else flag,
                                 folder_id=destination or row.folder_id)
            planned.append(Planned(action=action, row=optimistic, version=version, before=row))
        return planned

    def _commit(self, account: Account, planned: Sequence[Planned], events: EventPublisher | None,
                jobs: JobQueue | None = None) -> None:
        """Claim, store the optimistic rows, publish them, mark a risen epoch, queue the job (docs/actions.md).

        Each step waits only for what it needs. The claim comes first (a job must never run without its
        number); the rows' folder epochs are read beside it, and a bulk action's kept list is written beside
        the rows (neither needs more than the claim's numbers). Published onto ``events`` as soon as the
        rows are stored, not only when the ACTION job is done (the job waits for the provider, and until
        then the user's other pages would show the old row), and not after the enqueue either: that is the
        path to the other pages, and the epoch re-read and the enqueue after the write are two more round
        trips (``events`` sends at once in the HTTP functions: ``ImmediatePublisher``). So a page may show a
        change for a moment whose job then could not be queued: the request answers that error, and
        ``_take_back`` puts the rows back, at a version above the optimistic one, and publishes them too, so
        every page ends as the store does, as after a revert. The job is still queued before the call
        returns (before the 202), sent inside the call, on ``jobs`` when given
        (``mailsync.jobs.WakingJobQueue``), so a failed send is answered here.
        """
        if not planned:
            return
        account_id = account.account_id
        rows = [p.row for p in planned if p.row is not None]
        epochs = self._side_task(self._epochs, account_id, sorted({r.folder_id for r in rows})) if rows else None
        claimed = self._ledger().claim(account_id, [
            claim_of(p.action, p.row.folder_id if p.row is not None else None) for p in planned])
        planned = [replace(p, seq=claimed[p.action.message_id].seq) for p in planned]
        job = self._side_task(self._action_job, account_id, planned, attempt=0, reason="user action")
        published: Future[Any] | None = None
        try:
            before = epochs.result() if epochs is not None else {}
            self._write_at_epochs(account_id, rows, before)
            removals: dict[str, list[str]] = {}
            for p in planned:
                if p.row is None:
                    removals.setdefault(p.action.folder_id, []).append(p.action.message_id)
            for folder_id, ids in removals.items():
                self._store().remove_messages(account_id, folder_id, ids)
            if events is not None:
                published = self._side_task(events.publish_changes, _optimistic_changes(account_id, planned))
            self._mark_risen_epochs(account_id, rows, before)
            for p in planned:
                self._observe(p.action, "queued")
            (jobs if jobs is not None else self._queue()).enqueue(job.result())
        except BaseException:
            if published is not None:
                _settle(published)          # the optimistic rows go out before the rows put back
            self._take_back(account, planned, claimed, events if published is not None else None, job)
            raise
        if published is not None:
            published.result()

    def _take_back(self, account: Account, planned: Sequence[Planned], claimed: Mapping[str, Claimed],
                   events: EventPublisher | None, job: Future[Job]) -> None:
        """The actions were claimed but never queued (the queue or the store failed): undo both, then the
        caller's error answers the request, so the user knows they did not happen.

        Left claimed, the ledger said a newer action owned those fields, and an older action's job still
        on the queue dropped them as superseded (mailsync.actions.ordering) — for an action that never
        runs: neither the older nor the newer value reached the provider, and the optimistic row stayed.
        So the rows go back to what the store had (at a version that beats the optimistic row, or the
        tombstone of its removal, like a revert) and each claim hands its fields back to the claims it
        took them from. ``events``: the optimistic rows were published (``_commit``), so the rows put back
        are too. A bulk action's kept list goes. Best effort: if the store or the ledger fails here too,
        that is logged; the original error is what the caller sees.
        """
        account_id = account.account_id
        for p in planned:
            self._observe(p.action, "failed")
        try:
            self._ledger().release(account_id, {p.action.message_id: claimed[p.action.message_id]
                                                for p in planned})
        except MailsyncError as exc:
            log.error("could not release the claims of actions that were not queued: %s", exc.code,
                      extra={"account_id": account_id, "error_code": exc.code})
        now_ms = int(self._clock() * 1000)
        graph = account.provider is Provider.OUTLOOK
        # Absent: the optimistic row was a removal (a delete for good), whose tombstone is one above.
        rows = [replace(p.before, version=revert_version(p.version, now_ms, clock=uses_clock(graph, p.version),
                                                         truth=p.before.version, absent=p.row is None))
                for p in planned if p.before is not None]
        try:
            self._write_rows(account_id, rows)
        except MailsyncError as exc:
            log.error("could not put back the rows of actions that were not queued: %s", exc.code,
                      extra={"account_id": account_id, "error_code": exc.code})
        else:
            if events is not None and rows:
                events.publish_changes(MessagesChanged(account_id=account_id, upserted=tuple(rows)))
        wait([job])                           # its kept list, if it wrote one, is ours to drop
        batch_id = job.result().attrs.get("batch") if job.exception() is None else None
        if batch_id:
            try:
                self._ledger().drop_batch(account_id, batch_id)
            except MailsyncError as exc:     # the hourly purge takes it (SearchActionLedger.purge)
                log.info("could not drop the list of a bulk action that was not queued: %s", exc.code,
                         extra={"account_id": account_id, "error_code": exc.code})

    def _write_rows(self, account_id: str, rows: Sequence[Message], *,
                    before: Mapping[str, int] | None = None) -> None:
        """Rows into the store at their folders' sync epochs, raised to the epoch of a resync begun meanwhile.

        Every row the service writes carries its folder's current epoch, or a resync of that folder that
        has passed the message deletes it as unseen (docs/store.md). "Current" is read before the write,
        though, and a resync can begin in between: it bumps the epoch, lists the message and writes it in
        the new epoch, and then our write, a whole document, puts the old epoch back over the resync's
        mark. When that resync ends, ``remove_stale`` deletes the row; if the action was a no-op at the
        provider (the other client had moved it there, or set that flag, already) no delta round lists it
        again: missing for good (the convergence test's rare ``missing=1``, a message in Deleted Items after
        a burst of resyncs). So the epochs are read again after the write, and where one rose the row is
        marked as seen by that folder's resync (``MessageStore.raise_epoch``: a seen mark beside the row,
        never an update of it, which would raise its version and refuse the equal-MODSEQ undo). A resync
        begun after that second read pages after our write, so it sees the row like any other. Left open:
        a resync that begins, lists the message and also *ends* between the first read and the mark (one
        bulk write and one point read apart) still deletes it.

        ``before``: the epochs, when the caller read them already. ``_commit`` runs the two halves itself
        (``_write_at_epochs``, ``_mark_risen_epochs``), publishing between them.
        """
        if not rows:
            return
        if before is None:
            before = self._epochs(account_id, sorted({row.folder_id for row in rows}))
        self._write_at_epochs(account_id, rows, before)
        self._mark_risen_epochs(account_id, rows, before)

    def _write_at_epochs(self, account_id: str, rows: Sequence[Message], epochs: Mapping[str, int]) -> None:
        """The rows in one bulk write per epoch value (``epochs``: per folder), not per folder: a bulk action's
        500 rows span a dozen folders, mostly at the same epoch. The groups, disjoint documents, are written
        side by side (500 rows in 11 folders were 7 groups, after resyncs)."""
        if not rows:
            return
        store = self._store()
        by_epoch: dict[int, list[Message]] = {}
        for row in rows:
            by_epoch.setdefault(epochs.get(row.folder_id, 0), []).append(row)
        groups = list(by_epoch.items())
        written = [self._side_task(store.upsert_messages, group, epoch=epoch) for epoch, group in groups[1:]]
        store.upsert_messages(groups[0][1], epoch=groups[0][0])
        for future in written:
            future.result()

    def _mark_risen_epochs(self, account_id: str, rows: Sequence[Message], before: Mapping[str, int]) -> None:
        """After ``_write_at_epochs``: the epochs read again, and the rows of a folder whose epoch rose since
        ``before`` marked with it (``_write_rows`` says why)."""
        if not rows:
            return
        by_folder: dict[str, list[str]] = {}
        for row in rows:
            by_folder.setdefault(row.folder_id, []).append(row.message_id)
        store = self._store()
        for folder_id, epoch in self._epochs(account_id, sorted(by_folder)).items():
            if epoch > before.get(folder_id, 0):
                store.raise_epoch(account_id, folder_id, by_folder[folder_id], epoch)

    # --- the worker ----------------------------------------------------------------------------------

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
            self._write_rows(account_id, [moved])
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
        self._enqueue(account.account_id, planned, attempt=attempt + 1, reason="user action (retry)",
                      delay_s=min(delay, 300.0))

    def _enqueue(self, account_id: str, planned: Sequence[Planned], *, attempt: int, reason: str,
                 delay_s: float = 0.0, restore: bool = False) -> None:
        self._queue().enqueue(self._action_job(account_id, planned, attempt=attempt, reason=reason,
                                               restore=restore), delay_s=delay_s)

    def _action_job(self, account_id: str, planned: Sequence[Planned], *, attempt: int, reason: str,
                    restore: bool = False) -> Job:
        """One ACTION job: the actions in it when they fit a queue message, else kept in the ledger and named.

        Not a job per 16 kB of actions: ~27 Graph ids fit one, so 500 made ~19 jobs that the worker ran at
        once, whose batches then fought over the mailbox's 4 request slots (429s, Retry-After) — 40 s for
        what one job does in ~13 (bench/actions.py).
        """
        text = encode_actions(planned)
        attrs = {"attempt": str(attempt)}
        if restore:
            attrs["restore"] = "1"     # put the rows back only: the actions failed already (``_restore``)
        if len(text) <= _JOB_BUDGET:
            attrs["actions"] = text
        else:
            attrs["batch"] = self._ledger().put_batch(account_id, text)
        return new_job(JobKind.ACTION, account_id, reason=reason, attrs=attrs)

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
            self._write_rows(account_id, [row])
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
        self._enqueue(account_id, unread, attempt=attempt + 1, reason="user action (restore)",
                      delay_s=min(float(2 ** attempt), 300.0), restore=True)


def _optimistic_changes(account_id: str, planned: Sequence[Planned]) -> MessagesChanged:
    """What the user's other pages are told of accepted actions: the rows as they will look; a move also
    leaves the folder it was in, a delete for good is a removal."""
    return MessagesChanged(
        account_id=account_id,
        upserted=tuple(p.row for p in planned if p.row is not None),
        removed=tuple((p.action.folder_id, p.action.message_id) for p in planned
                      if p.row is None or p.row.folder_id != p.action.folder_id))


def _held(slots: Future[list[Any]]) -> list[Any]:
    """The slots ``_take_slots`` took, when the job cannot use them (the ledger read failed): none if taking
    them failed too (that error is not the one the job fails with)."""
    try:
        return slots.result()
    except Exception:
        return []


def _settle(future: Future[Any]) -> None:
    """Wait for ``future`` and log what it raised (a cleanup path: the error being answered matters more)."""
    try:
        future.result()
    except Exception:
        log.exception("publishing the optimistic rows failed")


def _merge(a: MessagesChanged, b: MessagesChanged) -> MessagesChanged:
    return MessagesChanged(account_id=a.account_id, upserted=a.upserted + b.upserted, removed=a.removed + b.removed)


