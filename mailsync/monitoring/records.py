"""Records and ports of change monitoring.

Three small tables back this package (``mailsync.storage.subscriptions``):

* a **subscription** row per Graph subscription, keyed by its id — the
  webhook's only lookup (one point read per distinct subscription in a
  notification batch);
* a **monitor** row per account and subscription kind (``me/messages``,
  ``me/mailFolders``) — which subscription is current, when it expires, and
  whether creating or renewing it is failing (then the account is polled
  instead, or for folders: folder changes wait for the sweep);
* a **pending** row per account — the notifications received but not yet
  turned into sync jobs. It is the coalescing gate: while it exists, a job
  that will read it is on the queue, so new notifications only merge into
  it instead of enqueueing another job.

Every partition is one account or one subscription: nothing grows with the
mailbox, nothing costs a write per email.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from mailsync.models import Account
from mailsync.storage.sync_rows import AccountSyncState


class ChangeType(enum.StrEnum):
    """Graph's changeType values for message subscriptions."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


class SubscriptionKind(enum.StrEnum):
    """What a subscription watches; the value is its Graph resource.

    Messages say "message X changed" (the engine resolves the folders);
    folders say "folder F was created, renamed, moved or deleted", which one
    folder-list round brings to the store (names and parents included).
    """

    MESSAGES = "me/messages"
    FOLDERS = "me/mailFolders"

    @classmethod
    def of_resource(cls, resource: str) -> SubscriptionKind:
        """The kind of a stored subscription row (rows older than folder subscriptions are messages)."""
        return cls.FOLDERS if resource.strip().strip("/").lower() == "me/mailfolders" else cls.MESSAGES


@dataclass(frozen=True)
class Subscription:
    """One Graph subscription we created, as the webhook needs it.

    ``client_state_hash`` is the SHA-256 of the random clientState sent to
    Graph at creation; the clientState itself is never stored.
    """

    subscription_id: str
    account_id: str
    client_state_hash: str
    expires_at: datetime
    created_at: datetime
    resource: str = "me/messages"


@dataclass(frozen=True)
class AccountMonitor:
    """How one account is being watched.

    ``subscription_id`` is None while the account has no working
    subscription (never created, creation failing, webhooks disabled):
    the poll scheduler then polls it. ``failures`` counts consecutive
    failed create/renew attempts; ``retry_at`` is when the renewer tries
    again.
    """

    account_id: str
    subscription_id: str | None = None
    expires_at: datetime | None = None
    failures: int = 0
    last_error: str | None = None
    retry_at: datetime | None = None
    updated_at: datetime | None = None
    etag: str | None = None
    kind: SubscriptionKind = SubscriptionKind.MESSAGES

    def healthy(self, now: datetime) -> bool:
        """True when a subscription exists, has not expired and nothing is failing."""
        return (self.subscription_id is not None and self.failures == 0
                and self.expires_at is not None and self.expires_at > now)


@dataclass(frozen=True)
class PendingChanges:
    """Notifications of one account waiting for their NOTIFIED job.

    ``changes`` holds distinct (changeType, message id) pairs, at most
    ``Settings.notify_max_ids`` of them; beyond that ``all_folders`` is set
    and the ids are dropped (the job then syncs every folder). ``folder_notices``
    counts the notifications of the account's folder subscription (a folder
    created, renamed, moved or deleted): any makes the job add one
    folder-list round. ``enqueued_at``
    is when the job that will read this row was sent: a row much older than
    that job's expected pickup means the job was lost, and the next
    notification enqueues a new one.

    ``folders`` holds, per message id, the folder its ``created``
    notification named (Outlook's rich notifications carry the message's
    ``parentFolderId``, encrypted: ``mailsync.monitoring.resource_data``):
    the NOTIFIED job needs no ``GET`` to find where new or moved mail
    landed. An id with two different folders, or created without one, maps
    to ``UNKNOWN_FOLDER``: the job asks Graph, as before.

    ``versions`` holds, per message id, the version tag its notifications
    carried (Outlook's ``resourceData["@odata.etag"]``): a round that reads
    exactly that version in delta has seen the change, and needs no
    look-again (``mailsync.monitoring.handler``). An id notified with two
    different tags, or a created/updated notification without one, maps to
    ``UNKNOWN_VERSION``: which of its states is the newest cannot be told,
    so its rounds look again as before.
    """

    account_id: str
    changes: tuple[tuple[str, str], ...]
    all_folders: bool
    first_at: datetime
    enqueued_at: datetime
    etag: str | None = None
    folder_notices: int = 0
    versions: tuple[tuple[str, str], ...] = ()
    last_at: datetime | None = None     # when the newest of them reached the webhook (None: first_at)
    folders: tuple[tuple[str, str], ...] = ()

    @property
    def newest_at(self) -> datetime:
        return self.last_at or self.first_at

    @property
    def folders_changed(self) -> bool:
        return self.folder_notices > 0


UNKNOWN_VERSION = ""   # PendingChanges.versions: several versions notified, or one without a tag
UNKNOWN_FOLDER = ""    # PendingChanges.folders: created in two folders, or notified without one

# One notification as the pending row keeps it: (change type, message id, version tag or None,
# folder from the notification's resource data or None).
Notified = tuple[str, str, str | None, str | None]


def merge_folders(current: Sequence[tuple[str, str]], new: Iterable[Notified]) -> tuple[tuple[str, str], ...]:
    """Fold notifications into ``current``'s folders: what each ``created`` notification said it landed in.

    Only ``created`` says where a message is (new mail, a move's target);
    ``updated`` and ``deleted`` leave the folders alone (the store knows where
    the messages it holds are). A ``created`` without a folder, or a second
    one naming another folder, makes the id ``UNKNOWN_FOLDER`` for good: the
    job then looks it up at Graph (notifications may come out of order, so the
    later folder is not necessarily the current one).
    """
    folders = dict(current)
    for change_type, message_id, _tag, folder in new:
        if change_type != ChangeType.CREATED.value:
            continue
        known = folders.get(message_id)
        if folder is None or (known is not None and known != folder):
            folders[message_id] = UNKNOWN_FOLDER
        elif known is None:
            folders[message_id] = folder
    return tuple(folders.items())


def merge_versions(current: Sequence[tuple[str, str]],
                   new: Iterable[Notified]) -> tuple[tuple[str, str], ...]:
    """Fold ``(change type, message id, version tag or None)`` notifications into ``current``'s versions.

    A replay (same tag) changes nothing; a second, different tag makes the
    id ``UNKNOWN_VERSION`` for good (notifications may come out of order, so
    the later one is not necessarily the newer version). A ``deleted``
    notification carries no tag (Outlook sends none): it adds nothing, its
    round looks for the removal instead.
    """
    versions = dict(current)
    for change_type, message_id, tag, _folder in new:
        if tag is None:
            if change_type != ChangeType.DELETED.value:
                versions[message_id] = UNKNOWN_VERSION
            continue
        known = versions.get(message_id)
        if known is None:
            versions[message_id] = tag
        elif known != tag:
            versions[message_id] = UNKNOWN_VERSION
    return tuple(versions.items())


def merge_changes(current: Sequence[tuple[str, str]], new: Iterable[tuple[str, str]], *,
                  max_ids: int) -> tuple[tuple[tuple[str, str], ...], bool]:
    """Distinct (changeType, id) pairs in arrival order; (pairs, overflowed)."""
    seen = set(current)
    merged = list(current)
    for pair in new:
        if pair not in seen:
            seen.add(pair)
            merged.append(pair)
    if len({message_id for _, message_id in merged}) > max_ids:
        return (), True
    return tuple(merged), False


@dataclass(frozen=True)
class PendingPart:
    """One webhook request's notifications for an account whose row was already pending.

    Written into the row as a property of its own (``PendingStore.add``), without
    reading the row first; the row as read is its own fields with every part folded
    in (``fold_part``). ``notified``: (change type, message id, version tag or None, folder or None);
    ``all_folders``: the request alone named more ids than a row keeps.
    """

    notified: tuple[Notified, ...]
    folder_notices: int = 0
    all_folders: bool = False
    at: datetime | None = None          # when it reached the webhook


def fold_part(row: PendingChanges, part: PendingPart, *, max_ids: int) -> PendingChanges:
    """``row`` with ``part`` merged in, as the webhook's read-and-replace would have merged it."""
    changes: tuple[tuple[str, str], ...] = ()
    overflow = True
    if not (row.all_folders or part.all_folders):
        changes, overflow = merge_changes(row.changes, ((ct, mid) for ct, mid, _, _ in part.notified),
                                          max_ids=max_ids)
    versions = () if overflow else merge_versions(row.versions, part.notified)
    folders = () if overflow else merge_folders(row.folders, part.notified)
    last_at = row.newest_at if part.at is None else max(row.newest_at, part.at)
    return replace(row, changes=changes, all_folders=overflow, versions=versions, folders=folders,
                   folder_notices=row.folder_notices + part.folder_notices, last_at=last_at)


class SubscriptionStore(Protocol):
    """Subscription and monitor rows (Azure Tables)."""

    def get(self, subscription_id: str) -> Subscription | None:
        ...

    def put(self, subscription: Subscription) -> None:
        """Insert or replace."""
        ...

    def delete(self, subscription_id: str) -> None:
        """Delete; a missing row is fine."""
        ...

    def get_monitor(self, account_id: str,
                    kind: SubscriptionKind = SubscriptionKind.MESSAGES) -> AccountMonitor | None:
        ...

    def save_monitor(self, monitor: AccountMonitor) -> AccountMonitor:
        """Insert (``etag`` None: fails with Conflict if a row exists) or replace
        if the stored row still has ``monitor.etag`` (else Conflict). Returns
        the stored record with its new etag."""
        ...

    def delete_monitor(self, account_id: str) -> None:
        """Delete the account's monitor rows of every kind (and its pending row)."""
        ...

    def monitors(self) -> Iterator[AccountMonitor]:
        """Every monitor row, of every kind (the timers' scan; one row per account and kind)."""
        ...


class PendingStore(Protocol):
    """The per-account coalescing gate (Azure Tables, ETag concurrency)."""

    def get(self, account_id: str) -> PendingChanges | None:
        ...

    def from_rows(self, rows: AccountSyncState) -> PendingChanges | None:
        """The pending row as the partition query of the account's sync rows read it (the same partition)."""
        ...

    def create(self, pending: PendingChanges) -> PendingChanges:
        """Insert; Conflict if the account already has a pending row."""
        ...

    def replace(self, pending: PendingChanges) -> PendingChanges:
        """Replace if unchanged since read (``pending.etag``); Conflict otherwise or if gone.

        The row is written whole: the parts ``add`` wrote are folded into it and go."""
        ...

    def add(self, account_id: str, part: PendingPart) -> bool:
        """Merge ``part`` into the account's row without reading it (one write, which changes its ETag).

        False when there is no row (taken meanwhile); Conflict when the part cannot be
        stored that way (too large, or the row holds too many parts): read and replace instead.
        """
        ...

    def delete(self, pending: PendingChanges) -> None:
        """Delete if unchanged since read; Conflict if it changed; a missing row is fine."""
        ...


class AccountDirectory(Protocol):
    """Reads accounts: one by id (webhook), all of them (timers)."""

    def get(self, account_id: str) -> Account | None:
        ...

    def iter_accounts(self) -> Iterator[Account]:
        ...


@dataclass(frozen=True)
class ResourceData:
    """Asks Graph to put the ``select``-ed properties into each notification, encrypted for our certificate."""

    select: str
    certificate: str            # base64 DER (only its public key is used)
    certificate_id: str


# Outlook keeps a subscription with resource data at most a day (4230 minutes without).
RICH_LIFETIME_S = 1440 * 60


def with_select(resource: str, data: ResourceData | None) -> str:
    """The subscription's resource URL: ``$select`` names what rich notifications carry."""
    return resource if data is None else f"{resource}?$select={data.select}"


def is_rich(resource: str) -> bool:
    """Whether a stored subscription's resource asks for resource data (it has a ``$select``)."""
    return "?$select=" in resource


@dataclass(frozen=True)
class SubscriptionRequest:
    """What we ask Graph to create."""

    resource: str
    change_types: tuple[ChangeType, ...]
    notification_url: str
    lifecycle_url: str
    client_state: str
    expires_at: datetime
    resource_data: ResourceData | None = None


@dataclass(frozen=True)
class CreatedSubscription:
    subscription_id: str
    expires_at: datetime


class SubscriptionApi(Protocol):
    """Graph's /subscriptions, on behalf of an account (its delegated token).

    Errors are the project's: ``NotFound`` when the subscription is gone,
    ``ProviderError`` subclasses otherwise (a failed validation handshake is
    a ``ProviderError`` with Graph's 400).
    """

    def create(self, account_id: str, request: SubscriptionRequest) -> CreatedSubscription:
        ...

    def renew(self, account_id: str, subscription_id: str, expires_at: datetime, *,
              resource_data: ResourceData | None = None) -> datetime:
        """Extend; returns the expiration Graph granted. ``resource_data``: hand the subscription our
        current certificate too (rotation rides on renewals)."""
        ...

    def delete(self, account_id: str, subscription_id: str) -> None:
        """Delete; an already deleted subscription is fine."""
        ...


class MessageLocator(Protocol):
    """Finds which folder messages are in now (Graph GET ?$select=parentFolderId)."""

    def parent_folders(self, account_id: str, message_ids: Sequence[str]) -> Mapping[str, str | None]:
        """message id → folder id (None when the message no longer exists)."""
        ...
