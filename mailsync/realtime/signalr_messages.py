"""Sync events → Azure SignalR output-binding messages, buffered per invocation.

The sync worker's SignalR output binding can be set once, at the end of an
invocation, so the engine publishes into a :class:`BufferingPublisher`
(an ``EventPublisher``) and the worker sets ``messages_json()`` as the
binding's value. Buffering also coalesces: progress keeps the latest event
per folder (plus the account-wide one), and changes merge into one
``messagesChanged`` per invocation, so a page never receives one message
per email.

Messages target the account's SignalR user id (= the account id: the
negotiate function issues connections with that user id), so a client only
ever receives its own account's events. Payloads (snake_case, like the REST
API)::

    syncProgress     {"account_id", "phase", "folder_id", "folders_done",
                      "folders_total", "messages_indexed", "rate_per_s"}
                     phase: folders | initial | incremental | resync | synced
                            | reauth_required
    messagesChanged  {"account_id",
                      "upserted": [{"message_id", "folder_id", "subject",
                                    "sender": {"name", "address"} | null,
                                    "received_at", "is_read", "flag_status",
                                    "importance", "has_attachments",
                                    "categories", "body_preview"}, ...],
                      "removed": [{"folder_id", "message_id"}, ...],
                      "upserted_total", "removed_total", "truncated"}

Apply ``removed`` first, then ``upserted`` (an upsert replaces the row with
that ``message_id``; a removal only removes the row if it still shows that
folder). When an invocation changed more than the caps below (an initial
sync page of 500), ``truncated`` is true and the lists hold the newest
part: the page should refetch its current view instead of patching.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from mailsync.errors import MailsyncError
from mailsync.models import Message, MessagesChanged, SyncProgress

if TYPE_CHECKING:
    from mailsync.ports import LiveSender

log = logging.getLogger(__name__)

TARGET_PROGRESS = "syncProgress"
TARGET_CHANGES = "messagesChanged"
TARGET_ACTIONS_FAILED = "actionsFailed"
MAX_UPSERTS = 200
MAX_REMOVALS = 1_000
PREVIEW_CHARS = 200


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _received(message: Message) -> float:
    return message.received_at.timestamp() if message.received_at else 0.0


def message_row(message: Message) -> dict[str, Any]:
    """The fields the list shows for one message.

    ``version`` is the store's version of the row (the provider's, or an
    action's optimistic one: mailsync.actions.versions). Live events reach
    the page out of order (the API publishes an action's row at once, a
    worker publishes a delta page's row a moment later, either may be
    delayed); the page keeps the newest by it, as the store does.
    """
    sender = message.sender
    return {
        "message_id": message.message_id,
        "folder_id": message.folder_id,
        "version": message.version,
        "subject": message.subject,
        "sender": {"name": sender.name, "address": sender.address} if sender else None,
        "received_at": _iso(message.received_at),
        "is_read": message.is_read,
        "flag_status": message.flag_status.value,
        "importance": message.importance,
        "has_attachments": message.has_attachments,
        "categories": list(message.categories),
        "body_preview": message.body_preview[:PREVIEW_CHARS],
    }


def progress_payload(event: SyncProgress) -> dict[str, Any]:
    return {
        "account_id": event.account_id, "phase": event.phase, "folder_id": event.folder_id,
        "folders_done": event.folders_done, "folders_total": event.folders_total,
        "messages_indexed": event.messages_indexed, "rate_per_s": event.rate_per_s,
    }


class _Changes:
    def __init__(self) -> None:
        self.upserted: dict[str, Message] = {}
        self.removed: dict[tuple[str, str], None] = {}
        self.upserted_total = 0
        self.removed_total = 0
        self.dropped = False

    def add(self, event: MessagesChanged) -> None:
        for folder_id, message_id in event.removed:
            self.removed_total += 1
            current = self.upserted.get(message_id)
            if current is not None and current.folder_id == folder_id:
                del self.upserted[message_id]
            self.removed[(folder_id, message_id)] = None
        for message in event.upserted:
            self.upserted_total += 1
            self.removed.pop((message.folder_id, message.message_id), None)
            self.upserted[message.message_id] = message
        if len(self.upserted) > 2 * MAX_UPSERTS:
            # An initial sync page after page: keep memory flat, the page refetches anyway.
            self.dropped = True
            newest = sorted(self.upserted.values(), key=_received, reverse=True)[:MAX_UPSERTS]
            self.upserted = {m.message_id: m for m in newest}
        if len(self.removed) > 2 * MAX_REMOVALS:
            self.dropped = True
            self.removed = dict.fromkeys(list(self.removed)[-MAX_REMOVALS:])

    def payload(self, account_id: str) -> dict[str, Any]:
        upserted = list(self.upserted.values())
        truncated = self.dropped or len(upserted) > MAX_UPSERTS or len(self.removed) > MAX_REMOVALS
        if len(upserted) > MAX_UPSERTS:
            upserted.sort(key=_received, reverse=True)
            upserted = upserted[:MAX_UPSERTS]
        removed = list(self.removed)[-MAX_REMOVALS:]
        return {
            "account_id": account_id,
            "upserted": [message_row(m) for m in upserted],
            "removed": [{"folder_id": f, "message_id": m} for f, m in removed],
            "upserted_total": self.upserted_total,
            "removed_total": self.removed_total,
            "truncated": truncated,
        }


class BufferingPublisher:
    """An ``EventPublisher`` that collects one invocation's events for the SignalR output binding."""

    def __init__(self) -> None:
        self._progress: dict[tuple[str, str | None], SyncProgress] = {}
        self._changes: dict[str, _Changes] = {}
        self._failures: dict[str, list[dict[str, Any]]] = {}

    def publish_action_failures(self, account_id: str, failures: list[dict[str, Any]]) -> None:
        """Actions the provider refused for good (``{"message_id", "code", "message"}``): the page says so."""
        if failures:
            self._failures.setdefault(account_id, []).extend(failures)

    def publish_progress(self, event: SyncProgress) -> None:
        key = (event.account_id, event.folder_id)
        self._progress.pop(key, None)   # re-insert: the latest update goes last
        self._progress[key] = event

    def publish_changes(self, event: MessagesChanged) -> None:
        if not event.upserted and not event.removed:
            return
        self._changes.setdefault(event.account_id, _Changes()).add(event)

    def __bool__(self) -> bool:
        return bool(self._progress or self._changes or self._failures)

    def messages(self) -> list[dict[str, Any]]:
        """SignalR output messages: changes first (the list), then progress, latest last."""
        out: list[dict[str, Any]] = []
        for account_id, changes in self._changes.items():
            out.append({"userId": account_id, "target": TARGET_CHANGES,
                        "arguments": [changes.payload(account_id)]})
        for account_id, failures in self._failures.items():
            out.append({"userId": account_id, "target": TARGET_ACTIONS_FAILED,
                        "arguments": [{"account_id": account_id, "failures": failures[:100]}]})
        for event in self._progress.values():
            out.append({"userId": event.account_id, "target": TARGET_PROGRESS,
                        "arguments": [progress_payload(event)]})
        return out

    def messages_json(self) -> str:
        """The output binding's value: a JSON array of SignalR messages."""
        return orjson.dumps(self.messages()).decode()


class ImmediatePublisher(BufferingPublisher):
    """An ``EventPublisher`` that sends each ``messagesChanged`` at once (``LiveSender``: the service's REST
    API), and buffers for the output binding only what could not be sent.

    For the HTTP functions that act on messages: their optimistic rows reach the user's other pages while
    the function still works (mailsync.realtime.live_sender says why). A failed send is logged and left to
    the binding, which the host writes when the function returns: later, never lost. ``publish_changes``
    may be called from another thread than the one reading the buffer afterwards (the action service
    publishes beside its last round trips), hence the lock.
    """

    def __init__(self, sender: LiveSender) -> None:
        super().__init__()
        self._sender = sender
        self._lock = threading.Lock()

    def publish_changes(self, event: MessagesChanged) -> None:
        if not event.upserted and not event.removed:
            return
        one = BufferingPublisher()
        one.publish_changes(event)
        try:
            self._sender.send(one.messages())
        except MailsyncError as exc:
            log.warning("live page not told at once (the output binding tells it): %s", exc.code,
                        extra={"account_id": event.account_id, "error_code": exc.code})
            with self._lock:
                super().publish_changes(event)

    def publish_progress(self, event: SyncProgress) -> None:
        with self._lock:
            super().publish_progress(event)

    def publish_action_failures(self, account_id: str, failures: list[dict[str, Any]]) -> None:
        with self._lock:
            super().publish_action_failures(account_id, failures)

    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return super().messages()
