"""Graph change notifications: validate, then coalesce into (few) queue jobs.

Graph POSTs ``{"value": [changeNotification, ...]}`` to the webhook and
wants a 2xx within 3 seconds, or it retries and eventually drops the
subscription. So the webhook does no Graph calls: it checks each item,
writes the message states rich notifications carry into the store and
tells the page (``mailsync.monitoring.notified_states``: a few store calls
per POST, never a table call), merges every item into the account's
*pending* row, and enqueues at most one NOTIFIED job per account.

Trust: the URL is public, so anyone can POST to it. An item counts only if
its ``clientState`` is one we gave a subscription. Subscriptions get a
*signed* clientState (``mailsync.monitoring.client_state``): it names the
account and the subscription's kind under our MAC, so the webhook
authenticates it without any table read, and the NOTIFIED job, which reads
the account anyway, drops the work of an account that is gone or not linked.
A clientState of the older, random kind counts only if its
``subscriptionId`` is one we created, the clientState hashes to the value
stored for *that* subscription (constant-time compare), and the
subscription's account still exists and is linked. Everything else is
dropped and logged (counts only, never the clientState) and acts on
nothing. A body that is not a well-formed notification collection is
rejected whole (400), before any item is looked at.

Cost (the URL is anonymous, so a flood must stay cheap): an item with a
signed clientState costs no read at all (a forged MAC is dropped on the
spot); a genuine one costs the pending row's insert and the job's send. For
the older clientStates: a request names at
most ``MAX_SUBSCRIPTIONS`` distinct subscription ids (Graph batches per
subscription; more is a 400, counted while parsing, before any storage
read), and the first id we do not know rejects the whole request without
looking up the rest. So a forged request costs one table read whatever it
holds, and a genuine one at most two reads per subscription. Before, each
of 5,000 forged ids was a read: 11.8 s for one request, and a genuine
notification queued behind six of them took 38.9 s (Graph allows 3 s).
Rejecting a whole request can drop an authentic item that shares it with
an id we deleted a moment ago; that costs a prompt, never data (the next
notification, a ``missed`` lifecycle event or the safety poll catches up).

Even an authentic item's data is only a provisional copy (notified states,
which delta's round replaces); what counts is "message X of account A
changed" (or, from the account's ``me/mailFolders`` subscription, "a folder
changed": the folder id is not even needed, one folder-list round reads
every rename, move, creation and deletion): the sync job re-reads the truth
from Graph's delta. So a replayed
or duplicated notification can at worst cause one extra, idempotent sync;
while the first one's job is still pending it causes nothing at all (the
pending row already holds it). The job takes (deletes) the row before it
reads the mailbox, so a repeat that finds the row is covered by reads still
to come; one that arrives later, a replay or a second change to the same
message, creates a new row and job (``mailsync.monitoring.handler``).

Coalescing (why a row and not one job per request): Graph batches
notifications, but a burst of 1,000 changes still arrives as dozens of
requests. The pending row makes that one job per account per cycle of
the worker: the first request creates the row and enqueues the job (with
an optional delay, ``NOTIFY_COALESCE_S``, default 0: measured, the row
alone coalesces well and a delay only adds latency); later requests only
merge ids into the row; the job deletes the row (ETag-checked) before it
resolves and syncs, and a request after that starts the next row and job.
See docs/change-monitoring.md for the measurements.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from mailsync.errors import Conflict, DependencyUnavailable, InputError, MailsyncError
from mailsync.jobs import JobKind, new_job
from mailsync.models import Job
from mailsync.monitoring.client_state import ClientStates
from mailsync.monitoring.delta_lag import DeltaLag
from mailsync.monitoring.notified_states import NotifiedChange, NotifiedStates, Told
from mailsync.monitoring.pending_seen import SeenPendingRows
from mailsync.monitoring.records import (
    AccountDirectory,
    ChangeType,
    Notified,
    PendingChanges,
    PendingPart,
    PendingStore,
    Subscription,
    SubscriptionKind,
    SubscriptionStore,
    merge_changes,
    merge_folders,
    merge_versions,
)
from mailsync.monitoring.resource_data import NotificationKeys, notified_message, parent_folder
from mailsync.monitoring.subscriptions import WATCHED_STATUSES
from mailsync.monitoring.validation_tokens import ValidationTokens
from mailsync.ports import JobQueue
from mailsync.security.secrets import secret_matches
from mailsync.settings import Settings

log = logging.getLogger("mailsync.monitoring.notifications")

MAX_ITEMS = 5_000                      # per request; Graph's batches are far smaller
MAX_SUBSCRIPTIONS = 10                 # distinct subscription ids per request (Graph batches per subscription)
MAX_SUBSCRIPTION_ID = 128
MAX_CLIENT_STATE = 128                 # Graph's limit for clientState
# Graph ids (immutable or not) are base64 with these characters; anything else is not Graph.
MESSAGE_ID = re.compile(r"^[A-Za-z0-9+/=_.:-]{1,512}$")
# ``Users('u')/Messages('m')`` (documented form) or ``Users/u/Messages/m`` (what Graph sends today).
RESOURCE_ID = re.compile(r"[Mm]essages(?:\('([^'/]{1,512})'\)|/([^/']{1,512}))$")
# resourceData's "@odata.etag" (the message's version, W/"<changeKey>"): printable ASCII, short.
VERSION_TAG = re.compile(r'^[\x21-\x7e]{1,256}$')
# A pending row whose job was enqueued longer ago than this is presumed lost
# (the job dead-lettered or the enqueue after the insert failed): the next
# notification enqueues a fresh job. Generous, because a busy queue delays pickup.
PENDING_STALE_S = 300
# A row whose job this process saw enqueued less than this ago is added to without a read
# (mailsync.monitoring.pending_seen); the minute's margin covers clocks of other processes.
PENDING_FRESH_S = PENDING_STALE_S - 60
MERGE_ATTEMPTS = 8
# A NOTIFIED job confirming states the page already shows: held this long past the learnt delta lag,
# which counts as at least CONFIRM_MIN_LAG_S (Outlook's lag is not documented; the sandbox's is 1 s).
CONFIRM_MARGIN_S = 1.0
CONFIRM_MIN_LAG_S = 1.0
# A merged notification gets a job of its own unless the row's job is known to start within this of its want.
HASTEN_SLACK_S = 1.0


@dataclass(frozen=True)
class ChangeItem:
    """One change notification, structurally valid, not yet authenticated."""

    subscription_id: str
    client_state: str | None
    change_type: ChangeType | None     # None: a changeType we do not handle (dropped)
    message_id: str | None             # None: no usable message id (dropped)
    version: str | None = None         # resourceData's "@odata.etag" (Outlook: the changed version), if usable
    tenant_id: str | None = None
    encrypted: dict[str, Any] | None = None   # encryptedContent (rich notifications), not yet checked


@dataclass(frozen=True)
class ReceiveReport:
    """What one webhook request did: counts for the log and the tests."""

    received: int = 0
    accepted: int = 0
    dropped: int = 0
    jobs_enqueued: int = 0
    accounts: int = 0
    rejected: bool = False             # an unknown subscription id: nothing in the request was acted on
    told: int = 0                      # states written from resource data and removals, sent to the page


def require_collection(body: Any) -> list[dict[str, Any]]:
    """The ``value`` items of a notification collection: JSON objects naming few distinct subscriptions."""
    if not isinstance(body, dict) or not isinstance(body.get("value"), list):
        raise InputError('a notification body is a JSON object with a "value" array')
    items: list[dict[str, Any]] = body["value"]
    if len(items) > MAX_ITEMS:
        raise InputError(f"too many notifications in one request (over {MAX_ITEMS})")
    named: set[Any] = set()
    for item in items:
        if not isinstance(item, dict):
            raise InputError("every notification must be a JSON object")
        subscription_id = item.get("subscriptionId")
        if isinstance(subscription_id, str) and subscription_id not in named:
            named.add(subscription_id)
            if len(named) > MAX_SUBSCRIPTIONS:
                raise InputError(f"a notification request names more than {MAX_SUBSCRIPTIONS} subscriptions")
    return items


def subscription_fields(item: dict[str, Any]) -> tuple[str, str | None]:
    subscription_id = item.get("subscriptionId")
    if not isinstance(subscription_id, str) or not 0 < len(subscription_id) <= MAX_SUBSCRIPTION_ID:
        raise InputError("every notification needs a subscriptionId string")
    client_state = item.get("clientState")
    if client_state is not None and (not isinstance(client_state, str) or len(client_state) > MAX_CLIENT_STATE):
        raise InputError("clientState must be a string of at most 128 characters")
    return subscription_id, client_state


def _message_id(item: dict[str, Any]) -> str | None:
    data = item.get("resourceData")
    if data is not None and not isinstance(data, dict):
        raise InputError("resourceData must be an object")
    candidate: Any = data.get("id") if data else None
    if candidate is None:
        resource = item.get("resource")
        if isinstance(resource, str):
            match = RESOURCE_ID.search(resource)
            candidate = (match.group(1) or match.group(2)) if match else None
    if candidate is None:
        return None
    if not isinstance(candidate, str):
        raise InputError("resourceData.id must be a string")
    return candidate if MESSAGE_ID.match(candidate) else None


def _version_tag(item: dict[str, Any]) -> str | None:
    """The version tag Outlook puts in ``resourceData["@odata.etag"]``; None when absent or not tag-shaped.

    Not an error when malformed: it only spares a look-again, so an unusable
    one costs the look-again, never the notification.
    """
    data = item.get("resourceData")
    tag = data.get("@odata.etag") if isinstance(data, dict) else None
    return tag if isinstance(tag, str) and VERSION_TAG.match(tag) else None


def parse_change_notifications(body: Any) -> list[ChangeItem]:
    """Check the shape of a ``changeNotificationCollection``; InputError rejects it whole."""
    parsed: list[ChangeItem] = []
    for item in require_collection(body):
        subscription_id, client_state = subscription_fields(item)
        raw_type = item.get("changeType")
        if not isinstance(raw_type, str):
            raise InputError("every change notification needs a changeType string")
        try:
            change_type: ChangeType | None = ChangeType(raw_type)
        except ValueError:
            change_type = None
        tenant = item.get("tenantId")
        # Not an error when malformed: resource data only spares a lookup (mailsync.monitoring.resource_data).
        encrypted = item.get("encryptedContent")
        parsed.append(ChangeItem(subscription_id, client_state, change_type, _message_id(item), _version_tag(item),
                                 tenant if isinstance(tenant, str) else None,
                                 encrypted if isinstance(encrypted, dict) else None))
    return parsed


class UnknownSubscription(Exception):
    """Internal: an item names a subscription we do not have; the whole request is rejected."""


@dataclass(frozen=True)
class Vouched:
    """Whom an authentic item is about: the account, and whether its subscription watches folders."""

    account_id: str
    folders: bool


class NotificationAuthenticator:
    """Decides which items are ours: a signed clientState, or a known subscription, its clientState, a live account.

    Caches lookups for the length of one request only, so a deleted
    subscription or account stops being accepted at once. An unknown
    subscription id raises ``UnknownSubscription``: the caller stops there,
    without looking up the request's other ids (the module docstring's cost rule).
    """

    def __init__(self, subscriptions: SubscriptionStore, accounts: AccountDirectory,
                 client_states: ClientStates | None = None) -> None:
        self._subscriptions = subscriptions
        self._accounts = accounts
        self._client_states = client_states
        self._subscription_cache: dict[str, Subscription | None] = {}
        self._account_cache: dict[str, bool] = {}

    def vouch(self, subscription_id: str, client_state: str | None) -> Vouched | None:
        """Whom the item is about, or None (drop the item); UnknownSubscription (drop the request).

        A signed clientState decides alone, with no storage call (``mailsync.monitoring.client_state``).
        """
        if client_state is not None and self._client_states is not None \
                and self._client_states.can_verify(client_state):
            signed = self._client_states.verify(client_state)
            return None if signed is None else Vouched(signed.account_id, signed.kind is SubscriptionKind.FOLDERS)
        subscription = self.authenticate(subscription_id, client_state)
        if subscription is None:
            return None
        return Vouched(subscription.account_id,
                       SubscriptionKind.of_resource(subscription.resource) is SubscriptionKind.FOLDERS)

    def authenticate(self, subscription_id: str, client_state: str | None) -> Subscription | None:
        """The subscription the item belongs to, or None (drop the item); UnknownSubscription (drop the request)."""
        if subscription_id not in self._subscription_cache:
            self._subscription_cache[subscription_id] = self._subscriptions.get(subscription_id)
        subscription = self._subscription_cache[subscription_id]
        if subscription is None:
            raise UnknownSubscription(subscription_id)
        # Constant-time compare against this subscription's hash: a clientState
        # that is valid for another subscription (another account) does not match.
        if client_state is None or not secret_matches(client_state, subscription.client_state_hash):
            return None
        if subscription.account_id not in self._account_cache:
            account = self._accounts.get(subscription.account_id)
            self._account_cache[subscription.account_id] = (account is not None
                                                            and account.status in WATCHED_STATUSES)
        return subscription if self._account_cache[subscription.account_id] else None


class NotificationReceiver:
    """The webhook's use case: authenticate items, coalesce per account, enqueue."""

    def __init__(self, settings: Settings, subscriptions: SubscriptionStore, accounts: AccountDirectory,
                 pending: PendingStore, queue: JobQueue, *, client_states: ClientStates | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 seen: SeenPendingRows | None = None, lag: DeltaLag | None = None,
                 keys: NotificationKeys | None = None, tokens: ValidationTokens | None = None,
                 states: NotifiedStates | None = None) -> None:
        """``seen``: the pending rows this process saw with a live job (one per process; a fresh one
        by default), which requests for those accounts add to without reading them. ``lag``: the delta
        lag this process's notified rounds met (``mailsync.monitoring.delta_lag``), which delays the
        NOTIFIED job past it; None: ``NOTIFY_COALESCE_S`` alone. ``keys`` and ``tokens``: read the
        folder of new and moved mail from rich notifications (``mailsync.monitoring.resource_data``);
        None: ignore resource data (the NOTIFIED job looks those folders up). ``states``: with ``keys``
        and ``tokens``, write the message states the data shows and tell the page at once
        (``mailsync.monitoring.notified_states``); None: the rounds alone write and tell."""
        self._settings = settings
        self._client_states = client_states
        self._subscriptions = subscriptions
        self._accounts = accounts
        self._pending = pending
        self._queue = queue
        self._clock = clock
        self._seen = seen if seen is not None else SeenPendingRows(fresh_s=PENDING_FRESH_S)
        self._lag = lag
        self._keys = keys
        self._tokens = tokens
        self._states = states

    def receive(self, body: Any) -> ReceiveReport:
        """Handle one parsed JSON body. InputError: malformed (nothing done)."""
        items = parse_change_notifications(body)
        auth = NotificationAuthenticator(self._subscriptions, self._accounts, self._client_states)
        per_account: dict[str, list[tuple[ChangeItem, str]]] = {}
        folder_notices: dict[str, int] = {}
        dropped = 0
        for item in items:
            try:
                vouched = auth.vouch(item.subscription_id, item.client_state)
            except UnknownSubscription:
                log.warning("rejected a notification request naming an unknown subscription (%d items)",
                            len(items), extra={"received": len(items)})
                return ReceiveReport(received=len(items), dropped=len(items), rejected=True)
            if vouched is not None and item.change_type is not None and vouched.folders:
                folder_notices[vouched.account_id] = folder_notices.get(vouched.account_id, 0) + 1
                per_account.setdefault(vouched.account_id, [])
                continue
            if vouched is None or item.change_type is None or item.message_id is None:
                dropped += 1
                continue
            per_account.setdefault(vouched.account_id, []).append((item, item.message_id))
        if dropped:
            # Counts only: never the clientState or the forged ids.
            log.warning("dropped %d of %d notifications (unknown subscription, clientState mismatch, "
                        "account gone or unusable item)", dropped, len(items),
                        extra={"dropped": dropped, "received": len(items)})
        resources = self._resources_of(body, [item for accepted in per_account.values() for item, _ in accepted])
        folders = self._folders_of(per_account, resources)
        enqueued = 0
        told = 0
        for account_id, accepted in per_account.items():
            told_here = Told(0, stored=False)
            if self._states is not None:
                # Before the pending row: the NOTIFIED job it starts then reads delta after this write.
                told_here = self._states.apply(account_id, [
                    NotifiedChange(item.change_type, message_id,
                                   notified_message(resources[id(item)], message_id, account_id)
                                   if id(item) in resources else None)
                    for item, message_id in accepted if item.change_type is not None])
                told += told_here.count
            notified: list[Notified] = [(item.change_type.value, message_id, item.version, folders.get(id(item)))
                                        for item, message_id in accepted if item.change_type is not None]
            notices = folder_notices.get(account_id, 0)
            delay_s = self._delay_s(page_told=told_here.count > 0, stored=told_here.stored and not notices)
            if self._coalesce(account_id, notified, folder_notices=notices, delay_s=delay_s):
                enqueued += 1
        return ReceiveReport(received=len(items), accepted=len(items) - dropped, dropped=dropped,
                             jobs_enqueued=enqueued, accounts=len(per_account), told=told)

    @staticmethod
    def _folders_of(per_account: dict[str, list[tuple[ChangeItem, str]]],
                    resources: dict[int, dict[str, Any]]) -> dict[int, str]:
        """``id(item)`` -> the folder a ``created`` item's data names (new mail, a move's target)."""
        folders: dict[int, str] = {}
        for accepted in per_account.values():
            for item, message_id in accepted:
                resource = resources.get(id(item))
                if resource is not None and item.change_type is ChangeType.CREATED:
                    folder = parent_folder(resource, message_id)
                    if folder is not None:
                        folders[id(item)] = folder
        return folders

    def _resources_of(self, body: Any, accepted: list[ChangeItem]) -> dict[int, dict[str, Any]]:
        """``id(item)`` -> its decrypted resource, for the authentic items whose data we use.

        ``created`` always (new mail, a move's target: its folder spares a
        lookup), ``updated`` only when notified states are written (else the
        store knows where the message is, and the RSA decryption would be
        CPU for nothing); ``deleted`` carries none. The POST's validation
        tokens are checked first, once (Microsoft's rule for resource data);
        when they fail, its resource data is ignored, never its
        notifications (their signed clientStates vouched for them).
        """
        wanted = {ChangeType.CREATED, ChangeType.UPDATED} if self._states is not None else {ChangeType.CREATED}
        rich = [item for item in accepted if item.encrypted is not None and item.message_id is not None
                and item.change_type in wanted]
        if not rich or self._keys is None or self._tokens is None:
            return {}
        if not self._tokens.verify(body.get("validationTokens"), {item.tenant_id or "" for item in rich}):
            log.warning("resource data of %d notification(s) ignored: the validation tokens do not check out",
                        len(rich), extra={"received": len(rich)})
            return {}
        resources: dict[int, dict[str, Any]] = {}
        for item in rich:
            try:
                resources[id(item)] = self._keys.decrypt(item.encrypted)
            except InputError as exc:
                log.warning("resource data of a notification ignored: %s", exc)
        return resources

    def _coalesce(self, account_id: str, notified: list[Notified], *, folder_notices: int = 0,
                  delay_s: float = 0.0) -> bool:
        """Merge into the pending row; True when this call enqueued a NOTIFIED job.

        ``notified``: (change type, message id, version tag or None, folder from resource data or None)
        per item. ``delay_s``: how long their job may wait (``_delay_s``). Merged into a row whose job
        this process does not know to be due by then (a row held for a confirmation, ``NOTIFY_CONFIRM_S``,
        or one another process made), they get a job of their own (``_hasten``): the first job to start
        takes the row, the later one finds nothing to do.

        Folder notices are counted, never de-duplicated: they carry nothing
        to tell a replay from a second rename. A notice that finds the row
        is covered by the folder-list round still to come (the job takes the
        row before it runs that round); a later one starts a new row and job.
        """
        max_ids = self._settings.notify_max_ids
        changes = [(change_type, message_id) for change_type, message_id, _, _ in notified]
        seen = self._seen
        row_there = False
        for _attempt in range(MERGE_ATTEMPTS):
            now = self._clock()
            if not row_there:
                # Insert first, read only when a row is there: usually the account has no pending row
                # (its last job already took it), and the insert alone is one table call instead of two.
                merged, overflow = merge_changes((), changes, max_ids=max_ids)
                row = PendingChanges(account_id, merged, overflow, first_at=now, enqueued_at=now,
                                     folder_notices=folder_notices,
                                     versions=() if overflow else merge_versions((), notified),
                                     folders=() if overflow else merge_folders((), notified))
                try:
                    self._pending.create(row)
                except Conflict:
                    row_there = True
                else:
                    self._enqueue_or_undo(account_id, delay_s)
                    seen.saw(account_id, now, notified, due_at=now + timedelta(seconds=delay_s))
                    return True
            if seen.is_replay(account_id, now, notified, folder_notices):
                # The very versions this process put in a row whose job is live: that job reads them.
                return False
            if seen.may_add(account_id, now):
                # The row's job was enqueued moments ago (mailsync.monitoring.pending_seen): add to the
                # row without reading it, one write instead of a read and a replace.
                distinct = len({message_id for _, message_id in changes})
                part = PendingPart((), folder_notices, True) if distinct > max_ids \
                    else PendingPart(tuple(notified), folder_notices)
                try:
                    if self._pending.add(account_id, part):
                        seen.added(account_id, notified)
                        return self._hasten(account_id, now, delay_s)
                    row_there = False     # taken meanwhile: insert a new one
                    continue
                except Conflict:
                    pass                  # too large for a part: read and replace (which folds the parts)
            current = self._pending.get(account_id)
            if current is None:
                row_there = False
                continue
            if current.all_folders:
                merged, overflow = (), True
            else:
                merged, overflow = merge_changes(current.changes, changes, max_ids=max_ids)
            versions = () if overflow else merge_versions(current.versions, notified)
            folders = () if overflow else merge_folders(current.folders, notified)
            stale = now - current.enqueued_at > timedelta(seconds=PENDING_STALE_S)
            if merged == current.changes and overflow == current.all_folders and versions == current.versions \
                    and folders == current.folders and not folder_notices and not stale:
                # Nothing new: a replay. The row's job has not read the mailbox yet (it takes the
                # row first), so its reads cover it. (The same message changed again carries
                # another version tag: that is new, the row must stop vouching for the first one.)
                seen.saw(account_id, current.enqueued_at, notified)
                return False
            updated = replace(current, changes=merged, all_folders=overflow, versions=versions, folders=folders,
                              folder_notices=current.folder_notices + folder_notices, last_at=now,
                              enqueued_at=now if stale else current.enqueued_at)
            try:
                self._pending.replace(updated)
            except Conflict:
                continue  # the job took the row meanwhile, or another request merged: read again
            if stale:
                log.warning("pending notifications had no live job; enqueueing another")
                self._queue.enqueue(self._job(account_id), delay_s=delay_s)
                seen.saw(account_id, updated.enqueued_at, notified, due_at=now + timedelta(seconds=delay_s))
                return True
            seen.saw(account_id, updated.enqueued_at, notified)
            return self._hasten(account_id, now, delay_s)
        raise DependencyUnavailable("notification gate is too contended; retry", retry_after_s=1)

    def _delay_s(self, *, page_told: bool = False, stored: bool = False) -> float:
        """The NOTIFIED job's visibility delay: ``NOTIFY_COALESCE_S``, or the delta lag rounds here
        have seen lately when longer (``mailsync.monitoring.delta_lag``).

        When the page was told (notified states), the job only confirms, and nothing waits for it:
        it is held ``CONFIRM_MARGIN_S`` past the lag (at least ``CONFIRM_MIN_LAG_S``), so that
        notifications merged into its row during the next second are past the lag too when it starts
        (its round reads every notified version the first time, with no in-place wait or look-again)
        and more of them share one job. The delay comes from the queue's visibility: no thread waits.

        When, besides, the store holds the notified state of every message the POST named
        (``stored``: no new mail only announced, no deletion, nothing refused), the round has nothing
        to bring to the page or the store that they lack; it confirms the states (and catches anything
        the notifications missed) after ``NOTIFY_CONFIRM_S``. At 1,000 accounts and 20 changes a second
        an account gets a change every ~50 s, so a confirmation held a second past the lag took one
        change: 0.97 queue messages, 3.2-3.3 queue and ~4.8 table transactions per change in
        ``bench/change_latency.py --scale-run``. Held longer, more changes of an account share it.
        """
        learnt = self._lag.delay_s() if self._lag is not None else 0.0
        if page_told:
            learnt = max(learnt, CONFIRM_MIN_LAG_S) + CONFIRM_MARGIN_S
            if stored:
                learnt = max(learnt, float(self._settings.notify_confirm_s))
        return max(self._settings.notify_coalesce_s, learnt)

    def _hasten(self, account_id: str, now: datetime, delay_s: float) -> bool:
        """After a merge: a job of its own for notifications whose row's job is not known to start in time."""
        want = now + timedelta(seconds=delay_s)
        if self._seen.due_by(account_id, want + timedelta(seconds=HASTEN_SLACK_S)):
            return False
        self._queue.enqueue(self._job(account_id), delay_s=delay_s)
        self._seen.hastened(account_id, want)
        return True

    def _job(self, account_id: str) -> Job:
        return new_job(JobKind.NOTIFIED, account_id, reason="webhook")

    def _enqueue_or_undo(self, account_id: str, delay_s: float = 0.0) -> None:
        try:
            self._queue.enqueue(self._job(account_id), delay_s=delay_s)
        except MailsyncError:
            # Without its job the row would swallow notifications until it goes stale.
            # Best effort: remove it so Graph's retry of this request starts clean.
            current = self._pending.get(account_id)
            if current is not None:
                try:
                    self._pending.delete(current)
                except MailsyncError:
                    log.warning("could not undo a pending row after a failed enqueue")
            raise
