"""Graph subscriptions: create, renew, recreate, delete — two per account.

Each Outlook account has a **messages** subscription (``me/messages``: mail
created, updated, deleted; the webhook resolves which folders to sync) and
a **folders** subscription (``me/mailFolders``: a folder created, renamed,
moved or deleted; the webhook asks for one folder-list round, so names and
the hierarchy reach the store and the page within seconds instead of at
the next sweep). Both live the same life below, each with its own monitor
row. Graph's resource table documents only message paths for mail; if
Graph refuses the folder collection, that monitor records the failure and
retries with back-off, and folder changes keep arriving as before (the
sweep, ``missed`` events, notifications about messages in unknown
folders). Polling is decided by the messages subscription alone.

Lifecycle of an account's subscription::

                 SUBSCRIPTION job (after linking) / renewer finds none
                                  │
                                  ▼
      ┌──────────── create ─────────────┐   fails (5xx, 429, handshake 400)
      │  POST /subscriptions            │──────────────► failing: failures+1,
      │  me/messages created,updated,   │                retry_at = now+backoff,
      │  deleted, clientState (signed,  │                the account is POLLED
      │  only its SHA-256 kept)         │                until a retry succeeds
      └──────────────┬──────────────────┘
                     ▼
                  healthy ◄──── renew (PATCH expirationDateTime) when less than
                     │          SUBSCRIPTION_RENEW_BEFORE_S is left, or on a
                     │          reauthorizationRequired lifecycle event
                     │
        404 on renew / subscriptionRemoved event ──► create again (new id,
                     │                               new clientState), then an
                     │                               incremental sync of every
                     │                               folder covers the gap
                     ▼
       account deleted ──► DELETE /subscriptions/{id} (best effort) and rows

Why a sync after every (re)creation: Graph only notifies changes made
after the subscription exists, and our row is written after Graph answers,
so a change in that window would be dropped as "unknown subscription".
Delta sync is authoritative; the notification only says *when* to look.

Webhooks need a notification URL Graph can reach. The sandbox runs beside
us (an http loopback URL works when it was started with
``--allow-http-loopback-webhooks``, as ``make run`` and the tests do);
against real Outlook ``PUBLIC_BASE_URL`` must be public HTTPS, otherwise
no subscription is created and every account is polled
(``mailsync.monitoring.polling``).
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from mailsync.errors import Conflict, MailsyncError, NotFound, ProviderError, ReauthRequired
from mailsync.jobs import EVERY_FOLDER, SUBSCRIBED, JobKind, new_job
from mailsync.models import Account, AccountStatus, Job, Provider
from mailsync.monitoring.client_state import ClientStates
from mailsync.monitoring.records import (
    RICH_LIFETIME_S,
    AccountDirectory,
    AccountMonitor,
    ChangeType,
    ResourceData,
    Subscription,
    SubscriptionApi,
    SubscriptionKind,
    SubscriptionRequest,
    SubscriptionStore,
    is_rich,
    with_select,
)
from mailsync.monitoring.resource_data import MESSAGE_SELECT, NotificationKeys
from mailsync.ports import JobQueue
from mailsync.security.secrets import hash_secret, new_secret
from mailsync.settings import Settings

log = logging.getLogger("mailsync.monitoring.subscriptions")

RESOURCE = SubscriptionKind.MESSAGES.value
KINDS = (SubscriptionKind.MESSAGES, SubscriptionKind.FOLDERS)
CHANGE_TYPES = (ChangeType.CREATED, ChangeType.UPDATED, ChangeType.DELETED)
WEBHOOK_PATH = "/api/graph/webhook"
LIFECYCLE_PATH = "/api/graph/lifecycle"
CLIENT_STATE_BYTES = 48          # 64 URL-safe characters: well under Graph's 128
MAX_RETRY_BACKOFF_S = 3600
# Accounts worth watching: linked and not waiting for the user to sign in again.
WATCHED_STATUSES = frozenset({AccountStatus.SYNCING, AccountStatus.SYNCED})

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class BeforeSync:
    """What ``SubscriptionManager.ensure_before_sync`` found and did."""

    account: Account | None                 # as read for the creations; None: gone
    made: frozenset[SubscriptionKind]       # the kinds it created


def webhooks_enabled(settings: Settings) -> bool:
    """Can Graph deliver notifications to ``PUBLIC_BASE_URL``?

    The sandbox runs beside us, so any URL works. Real Graph requires a
    public HTTPS endpoint: loopback, private and link-local hosts (and the
    default, unset value) mean "poll instead".
    """
    if settings.uses_graph_sandbox:
        return True
    parts = urlsplit(settings.public_base_url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host or host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True  # a DNS name; Graph's validation handshake has the last word
    return address.is_global


def retry_backoff_s(failures: int) -> int:
    """Minutes-scale back-off between failed create/renew attempts, capped at an hour."""
    return int(min(MAX_RETRY_BACKOFF_S, 60 * 2 ** max(0, min(failures - 1, 12))))


@dataclass(frozen=True)
class RenewalReport:
    """What one renewer pass did (the timer logs it)."""

    renew: int = 0
    create: int = 0
    removed: int = 0


class SubscriptionManager:
    """Keeps the two Graph subscriptions of every watched account healthy.

    Implements the ``SubscriptionRegistry`` port: account deletion calls
    :meth:`delete_for_account`. Provider failures never propagate from
    :meth:`ensure`/:meth:`renew`: they are recorded on the monitor row (the
    account is then polled and the renewer retries with back-off). Storage
    failures do propagate, so the queue retries the job.
    """

    def __init__(self, settings: Settings, store: SubscriptionStore, api: SubscriptionApi,
                 accounts: AccountDirectory, queue: JobQueue, *, client_states: ClientStates | None = None,
                 clock: Clock = utcnow, keys: NotificationKeys | None = None) -> None:
        """``keys``: our certificates for rich notifications; the messages subscription then asks Graph
        for each message's folder in its notifications (``mailsync.monitoring.resource_data``)."""
        self._settings = settings
        self._keys = keys
        # Signed clientStates let the webhook authenticate without a table read; without a
        # signer, a random one (only its hash kept) as before.
        self._client_states = client_states
        self._store = store
        self._api = api
        self._accounts = accounts
        self._queue = queue
        self._clock = clock
        base = settings.public_base_url.rstrip("/")
        self.notification_url = base + WEBHOOK_PATH
        self.lifecycle_url = base + LIFECYCLE_PATH
        self.enabled = webhooks_enabled(settings)

    # -- the account's subscriptions ------------------------------------------------
    #
    # The public methods act on both kinds and return the messages monitor
    # (the one polling, the page and the tests look at); lifecycle events
    # name one subscription, and act on its kind only.

    def ensure(self, account_id: str) -> AccountMonitor | None:
        """Make sure the account has both subscriptions, neither about to expire."""
        if not self.enabled:
            return None
        made: set[SubscriptionKind] = set()
        results = {kind: self._ensure_kind(account_id, kind, made) for kind in KINDS}
        return results[SubscriptionKind.MESSAGES]

    def ensure_before_sync(self, account_id: str) -> BeforeSync:
        """``ensure``, without queueing the sweeps that cover the time before a creation: the caller's
        sync, which starts after this returns, is that sweep. Returns the account as read (once, for
        both kinds) and the kinds created (nothing when webhooks are off, the account is gone, or Graph
        refused: the failure is recorded and retried)."""
        account = self._accounts.get(account_id)
        made: set[SubscriptionKind] = set()
        if self.enabled and account is not None:
            # Both kinds at once: the new account's sync waits on them, and each creation waits on
            # Graph's validation handshake with our webhook. Graph allows it: subscriptions are their
            # own service, limited per app and tenant (1,000 writes per 20 s), not by Outlook's four
            # concurrent requests per mailbox (docs: throttling-limits, "Subscription service limits").
            # Each kind has its own monitor row, so the two share nothing but ``made`` (set.add is atomic).
            def ensure(kind: SubscriptionKind) -> None:
                self._ensure_kind(account_id, kind, made, sweep=False, account=account)

            with ThreadPoolExecutor(max_workers=len(KINDS), thread_name_prefix="subscribe") as pool:
                done = [pool.submit(contextvars.copy_context().run, ensure, kind) for kind in KINDS]
            for future in done:
                future.result()   # a storage failure propagates: the job is retried
        return BeforeSync(account, frozenset(made))

    def renew(self, account_id: str, subscription_id: str | None = None) -> AccountMonitor | None:
        """Extend the subscriptions; recreate one Graph no longer knows.

        With ``subscription_id`` (a lifecycle event: reauthorizationRequired),
        only that subscription is renewed — one PATCH, which both extends and
        reauthorizes it, so Graph resumes its paused notifications; an event
        about a subscription that is no longer current is ignored.
        """
        if not self.enabled:
            return None
        if subscription_id is not None:
            kind = self._kind_of(account_id, subscription_id)
            if kind is None:
                log.info("lifecycle event for a replaced subscription ignored")
                return self._store.get_monitor(account_id)
            return self._renew_kind(account_id, kind, subscription_id)
        results = {kind: self._renew_kind(account_id, kind, None) for kind in KINDS}
        return results[SubscriptionKind.MESSAGES]

    def recreate(self, account_id: str, subscription_id: str) -> AccountMonitor | None:
        """Graph removed ``subscription_id`` (subscriptionRemoved): create a new one of its kind."""
        if not self.enabled:
            return None
        kind = self._kind_of(account_id, subscription_id)
        if kind is None:
            log.info("subscriptionRemoved for a replaced subscription ignored")
            return self._store.get_monitor(account_id)
        return self._create(account_id, self._store.get_monitor(account_id, kind), kind)

    def delete_for_account(self, account_id: str) -> None:
        """Delete the account's subscriptions at Graph (best effort) and every row of them.

        Called when the account is deleted. If Graph cannot be told (token
        already revoked, Graph down), the rows still go: the webhook then
        drops that subscription's notifications as unknown, and Graph
        expires it within three days.
        """
        monitors = [m for m in (self._store.get_monitor(account_id, kind) for kind in KINDS) if m is not None]
        for monitor in monitors:
            if monitor.subscription_id is None:
                continue
            try:
                self._api.delete(account_id, monitor.subscription_id)
            except MailsyncError as exc:  # Graph down, grant revoked, no token any more
                log.warning("could not delete the Graph subscription of a deleted account: %s", exc.code)
            self._store.delete(monitor.subscription_id)
        if monitors:
            self._store.delete_monitor(account_id)

    # -- one kind -------------------------------------------------------------------------

    def _ensure_kind(self, account_id: str, kind: SubscriptionKind,
                     made: set[SubscriptionKind] | None = None, *, sweep: bool = True,
                     account: Account | None = None) -> AccountMonitor | None:
        monitor = self._store.get_monitor(account_id, kind)
        now = self._clock()
        if (monitor is not None and monitor.subscription_id is not None and monitor.expires_at is not None
                and monitor.expires_at > now):
            if monitor.failures == 0 and not self._renewal_due(monitor, now):
                return monitor
            # Recreates when Graph no longer knows it.
            return self._renew_kind(account_id, kind, None, made, sweep=sweep, account=account)
        if (monitor is not None and monitor.subscription_id is None and monitor.failures
                and monitor.retry_at is not None and monitor.retry_at > now):
            # Creation keeps failing and its back-off has not passed: the job
            # came for the other kind; the renewer retries this one when due.
            return monitor
        return self._create(account_id, monitor, kind, made, sweep=sweep, account=account)

    def _renew_kind(self, account_id: str, kind: SubscriptionKind, subscription_id: str | None,
                    made: set[SubscriptionKind] | None = None, *, sweep: bool = True,
                     account: Account | None = None) -> AccountMonitor | None:
        monitor = self._store.get_monitor(account_id, kind)
        if monitor is None or monitor.subscription_id is None:
            return self._create(account_id, monitor, kind, made, sweep=sweep, account=account)
        if subscription_id is not None and subscription_id != monitor.subscription_id:
            log.info("lifecycle event for a replaced subscription ignored")
            return monitor
        current = self._store.get(monitor.subscription_id)
        if current is None:
            return self._create(account_id, monitor, kind, made, sweep=sweep, account=account)
        if kind is SubscriptionKind.MESSAGES and self._keys is not None \
                and current.resource != with_select(kind.value, self._resource_data(kind)):
            # Made before we had a certificate, or with another $select (before the notified states it
            # carried the folder alone): Graph cannot change a subscription's resource, so at its renewal
            # a new one with today's $select replaces it (once; rich subscriptions live a day at most).
            return self._create(account_id, monitor, kind, made, sweep=sweep, account=account)
        rich = is_rich(current.resource)
        wanted = self._expiration(self._clock(), rich=rich)
        try:
            # A rich subscription gets our current certificate with each renewal: that is how a
            # rotated key reaches every subscription within a renewal period.
            granted = self._api.renew(account_id, current.subscription_id, wanted,
                                      resource_data=self._resource_data(kind) if rich else None)
        except NotFound:
            log.info("subscription gone at Graph; recreating", extra={"subscription_id": current.subscription_id})
            return self._create(account_id, monitor, kind, made, sweep=sweep, account=account)
        except ProviderError as exc:
            return self._record_failure(account_id, monitor, exc, kind)
        self._store.put(replace(current, expires_at=granted))
        return self._save_monitor(account_id, monitor, kind, subscription_id=current.subscription_id,
                                  expires_at=granted)

    def _kind_of(self, account_id: str, subscription_id: str) -> SubscriptionKind | None:
        """The kind of one of the account's current subscriptions, or None (replaced, unknown)."""
        for kind in KINDS:
            monitor = self._store.get_monitor(account_id, kind)
            if monitor is not None and monitor.subscription_id == subscription_id:
                return kind
        if all(self._store.get_monitor(account_id, kind) is None for kind in KINDS):
            # No row at all (never created, or rows lost): a messages event recreates from scratch.
            row = self._store.get(subscription_id)
            return SubscriptionKind.of_resource(row.resource) if row is not None else SubscriptionKind.MESSAGES
        return None

    # -- the renewer timer ------------------------------------------------------------

    def renewal_pass(self) -> RenewalReport:
        """Enqueue a SUBSCRIPTION job for every account whose subscription needs work.

        The timer only scans and enqueues; the Graph calls run in the sync
        worker, in parallel and with the queue's retries. Rows of accounts
        that no longer exist are deleted here.
        """
        if not self.enabled:
            return RenewalReport()
        now = self._clock()
        monitors: dict[str, dict[SubscriptionKind, AccountMonitor]] = {}
        for row in self._store.monitors():
            monitors.setdefault(row.account_id, {})[row.kind] = row
        renew = create = removed = 0
        for account in self._watched_accounts():
            mine = monitors.pop(account.account_id, {})
            # One job per account: "ensure" when a subscription is missing or broken
            # (and its back-off has passed), else "renew" when one is due.
            wants_create = any(self._needs_create(mine.get(kind), now) for kind in KINDS)
            wants_renew = any(m.healthy(now) and self._renewal_due(m, now) for m in mine.values())
            job: Job | None = None
            if wants_create:
                job = new_job(JobKind.SUBSCRIPTION, account.account_id, reason="renewer",
                              attrs={"action": "ensure"})
                create += 1
            elif wants_renew:
                job = new_job(JobKind.SUBSCRIPTION, account.account_id, reason="renewer",
                              attrs={"action": "renew"})
                renew += 1
            if job is not None:
                self._queue.enqueue(job)
        for account_id in monitors:
            # Monitor rows without a watched account: deleted (or re-auth pending) account.
            if self._accounts.get(account_id) is None:
                self.delete_for_account(account_id)
                removed += 1
        return RenewalReport(renew=renew, create=create, removed=removed)

    @staticmethod
    def _needs_create(monitor: AccountMonitor | None, now: datetime) -> bool:
        if monitor is not None and monitor.subscription_id is not None and monitor.healthy(now):
            return False
        return monitor is None or monitor.retry_at is None or monitor.retry_at <= now

    # -- internals --------------------------------------------------------------------

    def _watched_accounts(self) -> Iterator[Account]:
        for account in self._accounts.iter_accounts():
            # Graph subscriptions are for Outlook accounts; IMAP ones are watched by mailsync.monitoring.imap_poll.
            if account.status in WATCHED_STATUSES and account.provider == Provider.OUTLOOK:
                yield account

    def _renewal_due(self, monitor: AccountMonitor, now: datetime) -> bool:
        assert monitor.expires_at is not None
        return monitor.expires_at - now <= timedelta(seconds=self._settings.subscription_renew_before_s)

    def _resource_data(self, kind: SubscriptionKind) -> ResourceData | None:
        """What the messages subscription asks Graph to carry in its notifications (None: ids only)."""
        if kind is not SubscriptionKind.MESSAGES or self._keys is None:
            return None
        current = self._keys.current
        return ResourceData(MESSAGE_SELECT, current.certificate, current.certificate_id)

    def _expiration(self, now: datetime, *, rich: bool = False) -> datetime:
        lifetime = self._settings.subscription_lifetime_s
        if rich:
            lifetime = min(lifetime, RICH_LIFETIME_S)
        # A little under the maximum: Graph rejects a request past it, and its clock is not ours.
        margin = min(300, lifetime // 10)
        return now + timedelta(seconds=lifetime - margin)

    def _create(self, account_id: str, monitor: AccountMonitor | None,
                kind: SubscriptionKind = SubscriptionKind.MESSAGES,
                made: set[SubscriptionKind] | None = None, *, sweep: bool = True,
                     account: Account | None = None) -> AccountMonitor | None:
        """Create the account's subscription of ``kind`` and queue the sweep that covers the time before it.

        ``made``: the kinds created so far by the same call (``ensure`` makes both), this one added.
        ``sweep``: False when the caller's sync, started after this call, is that sweep (``ensure_before_sync``).
        ``account``: as the caller read it just now (else read here).
        """
        if account is None:
            account = self._accounts.get(account_id)
        if account is None or account.status not in WATCHED_STATUSES:
            log.info("no subscription for an account that is gone or not linked")
            return monitor
        now = self._clock()
        client_state = self._client_states.new(account_id, kind) if self._client_states is not None \
            else new_secret(CLIENT_STATE_BYTES)
        data = self._resource_data(kind)
        request = SubscriptionRequest(resource=kind.value, change_types=CHANGE_TYPES,
                                      notification_url=self.notification_url, lifecycle_url=self.lifecycle_url,
                                      client_state=client_state,
                                      expires_at=self._expiration(now, rich=data is not None), resource_data=data)
        try:
            created = self._api.create(account_id, request)
        except (ProviderError, NotFound) as exc:
            return self._record_failure(account_id, monitor, exc, kind)
        subscription = Subscription(subscription_id=created.subscription_id, account_id=account_id,
                                    client_state_hash=hash_secret(client_state), expires_at=created.expires_at,
                                    created_at=now, resource=with_select(kind.value, data))
        self._store.put(subscription)
        try:
            saved = self._save_monitor(account_id, monitor, kind, subscription_id=created.subscription_id,
                                       expires_at=created.expires_at)
        except Conflict:
            # Someone else (renewer and lifecycle job racing) changed the account's
            # subscription meanwhile: theirs wins, ours goes.
            log.info("concurrent subscription change; dropping the one just created")
            self._discard(account_id, created.subscription_id)
            return self._store.get_monitor(account_id, kind)
        if monitor is not None and monitor.subscription_id not in (None, created.subscription_id):
            self._discard(account_id, monitor.subscription_id)
        # Close the window between Graph creating it and our row existing: a sweep of the folder list
        # and every folder (straight to the sync engine's job; SYNC_ACCOUNT would only enqueue it), or
        # of the folder list alone for the folders' subscription. Both created by one call (a new
        # account's): the messages' sweep covers the folder list too, and its look-agains as well.
        if sweep and kind is SubscriptionKind.MESSAGES:
            self._queue.enqueue(new_job(JobKind.SYNC_FOLDERS, account_id, reason=SUBSCRIBED,
                                        attrs={EVERY_FOLDER: "1"}))
        elif sweep and (made is None or SubscriptionKind.MESSAGES not in made):
            self._queue.enqueue(new_job(JobKind.SYNC_FOLDERS, account_id, reason=SUBSCRIBED))
        if made is not None:
            made.add(kind)
        log.info("subscription created", extra={"subscription_id": created.subscription_id, "resource": kind.value,
                                                 "expires_at": created.expires_at.isoformat()})
        return saved

    def _discard(self, account_id: str, subscription_id: str) -> None:
        try:
            self._api.delete(account_id, subscription_id)
        except MailsyncError as exc:
            log.warning("could not delete a replaced subscription: %s", exc.code)
        self._store.delete(subscription_id)

    def _record_failure(self, account_id: str, monitor: AccountMonitor | None, exc: MailsyncError,
                        kind: SubscriptionKind = SubscriptionKind.MESSAGES) -> AccountMonitor:
        failures = (monitor.failures if monitor else 0) + 1
        now = self._clock()
        log.warning("%s subscription create/renew failed (%d in a row): %s", kind.value, failures, exc.code,
                    extra={"error_code": exc.code})
        retry_at = now + timedelta(seconds=retry_backoff_s(failures))
        if isinstance(exc, ReauthRequired):
            retry_at = now + timedelta(seconds=MAX_RETRY_BACKOFF_S)
        fields = AccountMonitor(account_id=account_id,
                                subscription_id=monitor.subscription_id if monitor else None,
                                expires_at=monitor.expires_at if monitor else None,
                                failures=failures, last_error=exc.code, retry_at=retry_at, updated_at=now,
                                etag=monitor.etag if monitor else None, kind=kind)
        try:
            return self._store.save_monitor(fields)
        except Conflict:
            latest = self._store.get_monitor(account_id, kind)
            return latest if latest is not None else fields

    def _save_monitor(self, account_id: str, monitor: AccountMonitor | None, kind: SubscriptionKind, *,
                      subscription_id: str, expires_at: datetime) -> AccountMonitor:
        return self._store.save_monitor(AccountMonitor(
            account_id=account_id, subscription_id=subscription_id, expires_at=expires_at, failures=0,
            last_error=None, retry_at=None, updated_at=self._clock(), etag=monitor.etag if monitor else None,
            kind=kind))
