"""The small interfaces (Protocols) the core talks through.

Adapters live in their own modules (``mailsync.providers.graph``,
``mailsync.store.search_store`` with its engines, ``mailsync.storage.*``);
only they import a third-party client. A new provider or store is one
new module implementing one of these, plus the shared contract suite in
``tests/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from mailsync.actions.models import (
    ActionClaim,
    ActionOutcome,
    AttachmentContent,
    Claimed,
    LatestActions,
    MessageAction,
    MessageContent,
)
from mailsync.errors import MailsyncError
from mailsync.models import (
    Account,
    BulkResult,
    Folder,
    FolderBatch,
    FolderView,
    Job,
    LiveConnectionInfo,
    Mailbox,
    Message,
    MessageBatch,
    MessagePage,
    MessageQuery,
    MessagesChanged,
    SyncProgress,
)


class MailProvider(Protocol):
    """One account's mailbox at a provider (Graph, IMAP).

    Cursors are opaque strings: the engine stores them and hands them back,
    never looks inside. ``None`` means "from the beginning". Errors are
    ``mailsync.errors.ProviderError`` subclasses: ``ProviderThrottled`` and
    ``ProviderUnavailable`` (retry later), ``CursorExpired`` (resync the
    folder from scratch), ``ReauthRequired`` (stop until re-linked).
    """

    # Whether only a folder's newest few cursors stay valid (Outlook's delta links: each page read
    # issues one and pushes the oldest out), so the engine must not read far ahead of the one it
    # saved (mailsync.sync.pipeline's window). False: any cursor the provider issued stays valid.
    cursors_expire: bool

    def folder_changes(self, cursor: str | None) -> FolderBatch:
        """Next batch of folder-list changes after ``cursor``."""
        ...

    def message_changes(self, folder_id: str, cursor: str | None) -> MessageBatch:
        """Next batch of message changes in one folder after ``cursor``."""
        ...

    def message_changes_many(self, reads: Sequence[tuple[str, str | None]]) -> list[MessageBatch | MailsyncError]:
        """``message_changes`` of several (folder id, cursor) pairs, in as few round trips as the provider
        allows; per read its batch, or the error that read alone met (an error of them all raises)."""
        ...

    def newest_messages(self, folder_id: str, limit: int) -> tuple[Message, ...]:
        """The ``limit`` most recently received messages of a folder (first screen)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class MessageActions(Protocol):
    """The client half of one account's mailbox: read a message whole, change messages.

    A small interface beside ``MailProvider`` (the sync half): one module per
    provider implements it (``mailsync.providers.graph_actions``,
    ``imap_actions``). Errors as for ``MailProvider``; a message that is not
    there is ``NotFound``.
    """

    def read_message(self, folder_id: str, message_id: str) -> MessageContent:
        """Headers, body and attachment list, read now from the provider (never from the store)."""
        ...

    def read_attachment(self, folder_id: str, message_id: str, attachment_id: str, *,
                        max_bytes: int) -> AttachmentContent:
        """One attachment's bytes; ``PayloadTooLarge`` when over ``max_bytes`` (nothing more is read)."""
        ...

    def apply(self, actions: Sequence[MessageAction], *, parallel: int = 1) -> list[ActionOutcome]:
        """Carry out the actions (batched as the provider allows); one outcome per action, in order.

        ``parallel``: how many of the mailbox's concurrent requests the caller holds for the call, which a
        provider whose requests can overlap may fill (Graph: that many chained batches at once)."""
        ...

    def close(self) -> None:
        ...


class ActionLedger(Protocol):
    """Per message, the latest accepted user action on each field (mailsync.actions.ordering).

    ``claim`` numbers each claim higher than every earlier one on the same
    message, atomically per message, and records it as the latest on the
    fields it sets; ``latest`` reads what was recorded, including claims
    made a moment ago. ``put_batch`` / ``get_batch`` / ``drop_batch`` keep a
    bulk action's list for the one job that names it.
    """

    def claim(self, account_id: str, claims: Sequence[ActionClaim]) -> dict[str, Claimed]:
        ...

    def release(self, account_id: str, claimed: Mapping[str, Claimed]) -> None:
        """Undo claims whose action was never queued: each field still at the claim's number goes back
        to what the claim found (a field a newer claim took since stays that claim's)."""
        ...

    def latest(self, account_id: str, message_ids: Sequence[str]) -> dict[str, LatestActions]:
        ...

    def put_batch(self, account_id: str, actions: str) -> str:
        """Keep a job's action list too large for a queue message; the id the job names it by."""
        ...

    def get_batch(self, account_id: str, batch_id: str) -> str | None:
        """The list kept as ``batch_id``; None once dropped."""
        ...

    def drop_batch(self, account_id: str, batch_id: str) -> None:
        ...


class RequestSlots(Protocol):
    """The mailbox's concurrent-request slots the sync engine shares out (``SyncStateTable``)."""

    def acquire_slot(self, account_id: str, owner: str, max_slots: int) -> Any:
        """One free slot (an opaque handle), or None when all are held."""
        ...

    def acquire_slots(self, account_id: str, owners: Sequence[str], max_slots: int) -> Sequence[Any]:
        """Up to one free slot per owner (each its own delivery), as many as are free; none when all are held."""
        ...

    def release_slot(self, slot: Any) -> None:
        ...


class MessageActionsFactory(Protocol):
    """Opens the client half for an account."""

    def open_actions(self, account: Account) -> MessageActions:
        ...


class ProviderFactory(Protocol):
    """Opens a provider session for an account (credentials come from the token provider)."""

    def open(self, account: Account) -> MailProvider:
        ...


class TokenProvider(Protocol):
    """Hands out a valid access token (or secret) for an account.

    Refreshes through MSAL when needed; raises ``ReauthRequired`` when the
    grant is gone. ``force_refresh`` is used once after a 401.
    """

    def access_token(self, account_id: str, *, force_refresh: bool = False) -> str:
        ...


class MessageStore(Protocol):
    """The search store: writes from the engine, account-scoped reads for the API.

    Every read takes an ``account_id`` and can only ever return that
    account's documents.
    """

    def ensure_ready(self) -> str:
        """Create indices/aliases if missing; return the store's generation id."""
        ...

    def generation(self) -> str:
        """The generation id recorded when the indices were created.

        It changes when the indices are deleted and recreated (or restored),
        which tells the engine to resync.
        """
        ...

    def upsert_messages(self, messages: Sequence[Message], *, epoch: int = 0) -> BulkResult:
        """Index messages; a write older than the stored version is skipped (its id in ``stale_ids``)."""
        ...

    def remove_messages(self, account_id: str, folder_id: str, message_ids: Sequence[str]) -> BulkResult:
        """Delete messages that still say ``folder_id`` (moved ones are left alone)."""
        ...

    def raise_epoch(self, account_id: str, folder_id: str, message_ids: Sequence[str], epoch: int) -> BulkResult:
        """Mark messages as seen by ``folder_id``'s round of ``epoch`` (their documents and versions untouched)."""
        ...

    def remove_stale(self, account_id: str, folder_id: str, epoch: int) -> int:
        """After a resync: delete the folder's messages neither written in ``epoch`` (or later) nor marked seen."""
        ...

    def upsert_folders(self, folders: Sequence[Folder], *, phase: str | None = None) -> None:
        ...

    def set_folder_phase(self, account_id: str, folder_id: str, phase: str) -> bool:
        """Set an existing folder's sync phase only (never its name or parent); False when it is gone."""
        ...

    def set_folder_phases(self, account_id: str, folder_ids: Sequence[str], phase: str) -> None:
        """``set_folder_phase`` for several folders of one account at once (one request)."""
        ...

    def remove_folder(self, account_id: str, folder_id: str) -> None:
        """Delete a folder document and every message still in it."""
        ...

    def upsert_mailbox(self, mailbox: Mailbox) -> None:
        ...

    def delete_account(self, account_id: str) -> None:
        """Delete every document of the account, in both index families."""
        ...

    def list_messages(self, account_id: str, query: MessageQuery) -> MessagePage:
        ...

    def get_message(self, account_id: str, message_id: str) -> Message | None:
        ...

    def get_messages(self, account_id: str, message_ids: Sequence[str]) -> dict[str, Message]:
        """The account's messages among ``message_ids``, by id (the missing ones left out)."""
        ...

    def list_folders(self, account_id: str) -> list[FolderView]:
        ...

    def get_mailbox(self, account_id: str) -> Mailbox | None:
        """The account's mailbox document (address, status, totals), or None."""
        ...

    def begin_bulk_load(self, account_id: str, holder: str = "") -> None:
        """An initial load (of the account's ``holder``, e.g. a folder) starts: the store may relax its refresh.

        Call end_bulk_load with the same arguments after, even on error.
        """
        ...

    def end_bulk_load(self, account_id: str, holder: str = "") -> None:
        """That load ended: restore normal refresh once no other load is running."""
        ...

    def expire_bulk_loads(self) -> bool:
        """Undo the relaxed refresh of loads that died without ending (expired leases); True if it did."""
        ...

    def refresh(self) -> None:
        """Make recent writes visible to reads (tests, first screen)."""
        ...


class JobQueue(Protocol):
    """The sync job queue."""

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        """Send a job, invisible for ``delay_s`` seconds (back-off without sleeping)."""
        ...


class EventPublisher(Protocol):
    """Pushes progress and change events to the account's live page."""

    def publish_progress(self, event: SyncProgress) -> None:
        ...

    def publish_changes(self, event: MessagesChanged) -> None:
        ...


class AccountRepository(Protocol):
    """Local accounts (Azure Tables)."""

    def get(self, account_id: str) -> Account | None:
        ...

    def save(self, account: Account) -> Account:
        """Insert or replace with ETag concurrency; returns the stored record (new etag)."""
        ...

    def delete(self, account_id: str) -> None:
        ...


class GenerationLedger(Protocol):
    """The store generation last seen by the poll scheduler (mailsync.monitoring.store_watch)."""

    def seen(self) -> str:
        """The generation recorded last, or "" if none was."""
        ...

    def record(self, generation: str) -> None:
        ...


class SyncStatusReader(Protocol):
    """Summary of an account's sync progress for ``GET /api/accounts/{id}`` (the sync engine implements it)."""

    def summary(self, account_id: str) -> dict[str, Any]:
        """A small JSON-able dict (phase, folders done/total, messages indexed, last sync time)."""
        ...


class SubscriptionRegistry(Protocol):
    """The account's change subscriptions (change monitoring implements it)."""

    def delete_for_account(self, account_id: str) -> None:
        """Delete every subscription of the account, at the provider and locally (idempotent)."""
        ...


class LiveConnections(Protocol):
    """Mints connection info for the page's live channel (Azure SignalR Service, serverless).

    The user id must be one the caller has verified: every message for that
    user reaches whoever holds the token.
    """

    def connection_info(self, user_id: str) -> LiveConnectionInfo:
        ...


class LiveSender(Protocol):
    """Sends SignalR messages to the live page now, not when the function returns (its output binding)."""

    def send(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """``{"userId", "target", "arguments"}`` each; ``MailsyncError`` when they could not be sent."""
        ...
