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
then confirm each row or undo it (mailsync.actions.worker). The rows go into
the store at their folders' sync epochs (mailsync.actions.row_writes); the
jobs carry the actions inline or name them in the ledger
(mailsync.actions.action_jobs).

Idempotent under retry: a repeated PATCH writes the same row and sends
the provider a no-op; a move to the folder the row already says is no
action at all; deleting what is gone is done.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, TypeVar

from mailsync.actions.action_jobs import ActionJobs
from mailsync.actions.job_payload import Planned
from mailsync.actions.models import AttachmentContent, Claimed, MessageAction
from mailsync.actions.ordering import claim_of
from mailsync.actions.requests import MAX_ID_CHARS, Change, message_id_of, parse_change, parse_permanent
from mailsync.actions.row_writes import RowWrites
from mailsync.actions.sanitise import sanitise_html
from mailsync.actions.versions import optimistic_version, revert_version, uses_clock
from mailsync.actions.worker import ActionWorker
from mailsync.errors import (
    InputError,
    MailsyncError,
    NotFound,
)
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
        # The folders' current sync epochs (SyncStateTable.epochs): every row written here carries its folder's
        # (mailsync.actions.row_writes).
        self._epochs = epochs
        # For the calls an action makes side by side (_authenticated_row, _commit, the worker's _run); shared
        # by the host's threads. Its tasks never wait for one another (a full pool only queues them): all are I/O.
        self._side = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mailsync-actions")
        self._rows = RowWrites(store, epochs, self._side_task)
        self._jobs = ActionJobs(queue, ledger)
        self._worker = ActionWorker(accounts, store, actions, ledger, self._rows, self._jobs, self._side_task,
                                    clock=clock, observe=self._observe, slots=slots, max_slots=max_slots)

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
        job = self._side_task(self._jobs.job, account_id, planned, attempt=0, reason="user action")
        published: Future[Any] | None = None
        try:
            before = epochs.result() if epochs is not None else {}
            self._rows.write_at_epochs(account_id, rows, before)
            removals: dict[str, list[str]] = {}
            for p in planned:
                if p.row is None:
                    removals.setdefault(p.action.folder_id, []).append(p.action.message_id)
            for folder_id, ids in removals.items():
                self._store().remove_messages(account_id, folder_id, ids)
            if events is not None:
                published = self._side_task(events.publish_changes, _optimistic_changes(account_id, planned))
            self._rows.mark_risen_epochs(account_id, rows, before)
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
            self._rows.write_rows(account_id, rows)
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

    # --- the worker ----------------------------------------------------------------------------------

    def run_job(self, job: Job, events: EventPublisher) -> None:
        """Carry out an ACTION job (mailsync.actions.worker); never raises for a provider's refusal."""
        self._worker.run_job(job, events)


def _optimistic_changes(account_id: str, planned: Sequence[Planned]) -> MessagesChanged:
    """What the user's other pages are told of accepted actions: the rows as they will look; a move also
    leaves the folder it was in, a delete for good is a removal."""
    return MessagesChanged(
        account_id=account_id,
        upserted=tuple(p.row for p in planned if p.row is not None),
        removed=tuple((p.action.folder_id, p.action.message_id) for p in planned
                      if p.row is None or p.row.folder_id != p.action.folder_id))


def _settle(future: Future[Any]) -> None:
    """Wait for ``future`` and log what it raised (a cleanup path: the error being answered matters more)."""
    try:
        future.result()
    except Exception:
        log.exception("publishing the optimistic rows failed")
