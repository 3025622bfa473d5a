"""Domain records shared by the engine, the providers and the store.

Provider-neutral: nothing here names a Graph field or an IMAP command.
Providers map their wire formats to these; the store maps these to
documents. Times are timezone-aware UTC ``datetime``s.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


class AccountStatus(enum.StrEnum):
    """Lifecycle of a linked account, as shown by the API and the page."""

    LINKING = "linking"            # created, waiting for the OAuth callback
    SYNCING = "syncing"            # initial sync running
    SYNCED = "synced"              # initial sync done, following changes
    REAUTH_REQUIRED = "reauth_required"  # refresh token revoked or expired
    ERROR = "error"                # linking failed (readable error kept)


class Provider(enum.StrEnum):
    """Which mailbox provider an account uses."""

    OUTLOOK = "outlook"
    IMAP = "imap"

    @property
    def verifies_address(self) -> bool:
        """True when the provider vouches for the mailbox address (an OAuth identity platform).

        Only such an address may be claimed exclusively. An IMAP "address"
        is a user name on a server the caller chose: a login there proves
        nothing about who owns the address.
        """
        return self is Provider.OUTLOOK


class FlagStatus(enum.StrEnum):
    NOT_FLAGGED = "notFlagged"
    FLAGGED = "flagged"
    COMPLETE = "complete"


class SyncPhase(enum.StrEnum):
    """Phase of one folder's cursor (see the state machine in sync/engine.py)."""

    INITIAL = "initial"
    INCREMENTAL = "incremental"
    RESYNC = "resync"


@dataclass(frozen=True)
class Address:
    """A mail address with an optional display name."""

    address: str
    name: str = ""


@dataclass(frozen=True)
class Message:
    """One message as the store keeps it.

    ``message_id`` is the provider's immutable id (Graph ImmutableId, IMAP
    OBJECTID/X-GM-MSGID, or ``<uidvalidity>:<uid>`` where nothing better
    exists). ``version`` only ever grows for the same message: the store
    uses it as an external version so a stale write is a no-op.
    """

    account_id: str
    message_id: str
    folder_id: str
    version: int
    subject: str = ""
    sender: Address | None = None
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    received_at: datetime | None = None
    sent_at: datetime | None = None
    modified_at: datetime | None = None
    is_read: bool = False
    flag_status: FlagStatus = FlagStatus.NOT_FLAGGED
    importance: str = "normal"
    categories: tuple[str, ...] = ()
    has_attachments: bool = False
    conversation_id: str | None = None
    internet_message_id: str | None = None
    body_preview: str = ""
    body_text: str | None = None
    is_draft: bool = False


@dataclass(frozen=True)
class Folder:
    """One mail folder (Graph mailFolder, IMAP mailbox)."""

    account_id: str
    folder_id: str
    name: str
    parent_id: str | None = None
    role: str | None = None          # inbox, sentitems, drafts, deleteditems, junkemail, archive
    total_count: int | None = None   # as the provider reports it
    unread_count: int | None = None
    child_folder_count: int | None = None


@dataclass(frozen=True)
class Mailbox:
    """One linked address: the account as the mailboxes index shows it."""

    account_id: str
    address: str
    display_name: str
    provider: Provider
    status: AccountStatus
    total_messages: int | None = None
    last_sync_at: datetime | None = None


@dataclass(frozen=True)
class MessageBatch:
    """One step of a folder's change stream, as a provider returns it.

    ``cursor`` is opaque to everyone but the provider that made it: saving
    it and passing it back resumes exactly after this batch. ``complete``
    is True when this batch reached the end of the current round (Graph's
    deltaLink, IMAP's caught-up state): the folder is in sync as of now.
    A message id appears at most once in a batch, in ``upserts`` or in
    ``removals``: the provider keeps the stream's last word on it (a
    message moved away and back within the batch is an upsert).
    """

    upserts: tuple[Message, ...]
    removals: tuple[str, ...]          # provider message ids that left the folder
    cursor: str
    complete: bool
    # The provider's version tag of upserts that have one (Graph's ``@odata.etag``, which its change
    # notifications carry too): tells a round that read the notified version of a message.
    versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FolderBatch:
    """One step of the folder-list change stream (same contract as MessageBatch)."""

    upserts: tuple[Folder, ...]
    removals: tuple[str, ...]          # folder ids that were deleted
    cursor: str
    complete: bool


@dataclass(frozen=True)
class BulkResult:
    """What a bulk write did. Stale (older version) writes count as ``skipped``.

    ``stale_ids`` names the messages whose write was refused because a newer
    version is stored: what they said must not be shown either (a delta page
    read before a user action would undo it on the page, docs/actions.md).
    """

    written: int = 0
    skipped: int = 0
    failed_ids: tuple[str, ...] = ()    # dead-lettered, with reasons logged/kept
    stale_ids: tuple[str, ...] = ()     # message ids refused: a newer version is stored

    def __add__(self, other: BulkResult) -> BulkResult:
        return BulkResult(
            self.written + other.written,
            self.skipped + other.skipped,
            self.failed_ids + other.failed_ids,
            self.stale_ids + other.stale_ids,
        )


@dataclass(frozen=True)
class MessageQuery:
    """A read of one account's messages, newest first."""

    folder_id: str | None = None
    unread: bool | None = None
    flagged: bool | None = None
    q: str | None = None
    limit: int = 50
    cursor: str | None = None          # opaque search_after token from a previous page


@dataclass(frozen=True)
class MessagePage:
    """One page of messages and the cursor of the next page (None at the end)."""

    messages: tuple[Message, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class FolderView:
    """A folder with the counts the store holds for it."""

    folder: Folder
    stored_count: int
    stored_unread: int
    phase: str | None = None


@dataclass(frozen=True)
class SyncProgress:
    """A progress event for the page: published after every page of work."""

    account_id: str
    phase: str                       # folders | initial | incremental | synced | resync
    folder_id: str | None
    folders_done: int
    folders_total: int
    messages_indexed: int
    rate_per_s: float


@dataclass(frozen=True)
class MessagesChanged:
    """A change event: what the list on the page must patch, batched per page."""

    account_id: str
    upserted: tuple[Message, ...] = ()
    removed: tuple[tuple[str, str], ...] = ()   # (folder_id, message_id)


@dataclass(frozen=True)
class LiveConnectionInfo:
    """Where the page's SignalR client connects, and with which token (the negotiate answer)."""

    url: str                         # the service's client endpoint: <endpoint>/client/?hub=<hub>
    access_token: str = field(repr=False)

    def to_json(self) -> dict[str, str]:
        """The body ``@microsoft/signalr`` expects from a negotiate redirect."""
        return {"url": self.url, "accessToken": self.access_token}


@dataclass(frozen=True)
class Job:
    """A queue job for the sync worker. Serialised as JSON by mailsync.jobs."""

    kind: str                        # see mailsync.jobs.JobKind
    account_id: str
    folder_id: str | None = None
    job_id: str = ""
    reason: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Account:
    """A local account: what all mail data and mailboxes hang off.

    ``access_token_hash`` is the SHA-256 of the page's bearer secret; the
    secret itself is never stored. ``error`` is a readable message for the
    page (access denied, reauthorization required), never a token or a
    stack trace.
    """

    account_id: str
    provider: Provider
    status: AccountStatus
    access_token_hash: str
    created_at: datetime
    updated_at: datetime
    address: str | None = None
    display_name: str | None = None
    return_url: str | None = None
    error: str | None = None
    provider_user_id: str | None = None
    etag: str | None = None
