"""Graph subscriptions: create, renew, recreate, delete — one per account.

Lifecycle of an account's subscription::

                 SUBSCRIPTION job (after linking) / renewer finds none
                                  │
                                  ▼
      ┌──────────── create ─────────────┐   fails (5xx, 429, handshake 400)
      │  POST /subscriptions            │──────────────► failing: failures+1,
      │  me/messages created,updated,   │                retry_at = now+backoff,
      │  deleted, clientState (random,  │                the account is POLLED
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

Webhooks need a notification URL Graph can reach. Against the sandbox any
URL works (it runs beside us); against real Outlook ``PUBLIC_BASE_URL``
must be public HTTPS, otherwise no subscription is created and every
account is polled (``mailsync.monitoring.polling``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from mailsync.errors import Conflict, MailsyncError, NotFound, ProviderError, ReauthRequired
from mailsync.jobs import JobKind, new_job
from mailsync.models import Account, AccountStatus, Job, Provider
from mailsync.monitoring.records import (
    AccountDirectory,
    AccountMonitor,
    ChangeType,
    Subscription,
    SubscriptionApi,
    SubscriptionRequest,
    SubscriptionStore,
)
from mailsync.ports import JobQueue
from mailsync.security.secrets import hash_secret, new_secret
from mailsync.settings import Settings

log = logging.getLogger("mailsync.monitoring.subscriptions")

RESOURCE = "me/messages"
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
    """Keeps one healthy Graph subscription per watched account.

    Implements the ``SubscriptionRegistry`` port: account deletion calls
    :meth:`delete_for_account`. Provider failures never propagate from
    :meth:`ensure`/:meth:`renew`: they are recorded on the monitor row (the
    account is then polled and the renewer retries with back-off). Storage
    failures do propagate, so the queue retries the job.
    """

    def __init__(self, settings: Settings, store: SubscriptionStore, api: SubscriptionApi,
                 accounts: AccountDirectory, queue: JobQueue, *, clock: Clock = utcnow) -> None:
        self._settings = settings
        self._store = store
        self._api = api
        self._accounts = accounts
        self._queue = queue
        self._clock = clock
        base = settings.public_base_url.rstrip("/")
        self.notification_url = base + WEBHOOK_PATH
        self.lifecycle_url = base + LIFECYCLE_PATH
        self.enabled = webhooks_enabled(settings)

    # -- the account's subscription -------------------------------------------------

    def ensure(self, account_id: str) -> AccountMonitor | None:
        """Make sure the account has a subscription that is not about to expire."""
        if not self.enabled:
            return None
        monitor = self._store.get_monitor(account_id)
        now = self._clock()
        if (monitor is not None and monitor.subscription_id is not None and monitor.expires_at is not None
                and monitor.expires_at > now):
            if monitor.failures == 0 and not self._renewal_due(monitor, now):
                return monitor
            return self.renew(account_id)  # recreates when Graph no longer knows it
        return self._create(account_id, monitor)

    def renew(self, account_id: str, subscription_id: str | None = None) -> AccountMonitor | None:
        """Extend the current subscription; recreate it when Graph no longer knows it.

        With ``subscription_id`` (a lifecycle event), an event about a
        subscription that is no longer current is ignored.
        """
        if not self.enabled:
            return None
        monitor = self._store.get_monitor(account_id)
        if monitor is None or monitor.subscription_id is None:
            return self._create(account_id, monitor)
        if subscription_id is not None and subscription_id != monitor.subscription_id:
            log.info("lifecycle event for a replaced subscription ignored")
            return monitor
        current = self._store.get(monitor.subscription_id)
        if current is None:
            return self._create(account_id, monitor)
        wanted = self._expiration(self._clock())
        try:
            granted = self._api.renew(account_id, current.subscription_id, wanted)
        except NotFound:
            log.info("subscription gone at Graph; recreating", extra={"subscription_id": current.subscription_id})
            return self._create(account_id, monitor)
        except ProviderError as exc:
            return self._record_failure(account_id, monitor, exc)
        self._store.put(replace(current, expires_at=granted))
        return self._save_monitor(account_id, monitor, subscription_id=current.subscription_id,
                                  expires_at=granted)

    def recreate(self, account_id: str, subscription_id: str) -> AccountMonitor | None:
        """Graph removed ``subscription_id`` (subscriptionRemoved): create a new one."""
        if not self.enabled:
            return None
        monitor = self._store.get_monitor(account_id)
        if monitor is not None and monitor.subscription_id not in (None, subscription_id):
            log.info("subscriptionRemoved for a replaced subscription ignored")
            return monitor
        return self._create(account_id, monitor)

    def delete_for_account(self, account_id: str) -> None:
        """Delete the account's subscription at Graph (best effort) and every row of it.

        Called when the account is deleted. If Graph cannot be told (token
        already revoked, Graph down), the rows still go: the webhook then
        drops that subscription's notifications as unknown, and Graph
        expires it within three days.
        """
        monitor = self._store.get_monitor(account_id)
        if monitor is not None and monitor.subscription_id is not None:
            try:
                self._api.delete(account_id, monitor.subscription_id)
            except MailsyncError as exc:  # Graph down, grant revoked, no token any more
                log.warning("could not delete the Graph subscription of a deleted account: %s", exc.code)
            self._store.delete(monitor.subscription_id)
        if monitor is not None:
            self._store.delete_monitor(account_id)

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
        monitors = {m.account_id: m for m in self._store.monitors()}
        renew = create = removed = 0
        for account in self._watched_accounts():
            monitor = monitors.pop(account.account_id, None)
            job: Job | None = None
            if monitor is None or monitor.subscription_id is None or not monitor.healthy(now):
                if monitor is None or monitor.retry_at is None or monitor.retry_at <= now:
                    job = new_job(JobKind.SUBSCRIPTION, account.account_id, reason="renewer",
                                  attrs={"action": "ensure"})
                    create += 1
            elif self._renewal_due(monitor, now):
                job = new_job(JobKind.SUBSCRIPTION, account.account_id, reason="renewer",
                              attrs={"action": "renew"})
                renew += 1
            if job is not None:
                self._queue.enqueue(job)
        for stale in monitors.values():
            # A monitor row without a watched account: deleted (or re-auth pending) account.
            if self._accounts.get(stale.account_id) is None:
                self.delete_for_account(stale.account_id)
                removed += 1
        return RenewalReport(renew=renew, create=create, removed=removed)

    # -- internals --------------------------------------------------------------------

    def _watched_accounts(self) -> Iterator[Account]:
        for account in self._accounts.iter_accounts():
            # Graph subscriptions are for Outlook accounts; IMAP ones are watched by mailsync.monitoring.imap_poll.
            if account.status in WATCHED_STATUSES and account.provider == Provider.OUTLOOK:
                yield account

    def _renewal_due(self, monitor: AccountMonitor, now: datetime) -> bool:
        assert monitor.expires_at is not None
        return monitor.expires_at - now <= timedelta(seconds=self._settings.subscription_renew_before_s)

    def _expiration(self, now: datetime) -> datetime:
        lifetime = self._settings.subscription_lifetime_s
        # A little under the maximum: Graph rejects a request past it, and its clock is not ours.
        margin = min(300, lifetime // 10)
        return now + timedelta(seconds=lifetime - margin)

    def _create(self, account_id: str, monitor: AccountMonitor | None) -> AccountMonitor | None:
        account = self._accounts.get(account_id)
        if account is None or account.status not in WATCHED_STATUSES:
            log.info("no subscription for an account that is gone or not linked")
            return monitor
        now = self._clock()
        client_state = new_secret(CLIENT_STATE_BYTES)
        request = SubscriptionRequest(resource=RESOURCE, change_types=CHANGE_TYPES,
                                      notification_url=self.notification_url, lifecycle_url=self.lifecycle_url,
                                      client_state=client_state, expires_at=self._expiration(now))
        try:
            created = self._api.create(account_id, request)
        except (ProviderError, NotFound) as exc:
            return self._record_failure(account_id, monitor, exc)
        subscription = Subscription(subscription_id=created.subscription_id, account_id=account_id,
                                    client_state_hash=hash_secret(client_state), expires_at=created.expires_at,
                                    created_at=now, resource=RESOURCE)
        self._store.put(subscription)
        try:
            saved = self._save_monitor(account_id, monitor, subscription_id=created.subscription_id,
                                       expires_at=created.expires_at)
        except Conflict:
            # Someone else (renewer and lifecycle job racing) changed the account's
            # subscription meanwhile: theirs wins, ours goes.
            log.info("concurrent subscription change; dropping the one just created")
            self._discard(account_id, created.subscription_id)
            return self._store.get_monitor(account_id)
        if monitor is not None and monitor.subscription_id not in (None, created.subscription_id):
            self._discard(account_id, monitor.subscription_id)
        # Close the window between Graph creating it and our row existing.
        self._queue.enqueue(new_job(JobKind.SYNC_ACCOUNT, account_id, reason="subscribed"))
        log.info("subscription created", extra={"subscription_id": created.subscription_id,
                                                 "expires_at": created.expires_at.isoformat()})
        return saved

    def _discard(self, account_id: str, subscription_id: str) -> None:
        try:
            self._api.delete(account_id, subscription_id)
        except MailsyncError as exc:
            log.warning("could not delete a replaced subscription: %s", exc.code)
        self._store.delete(subscription_id)

    def _record_failure(self, account_id: str, monitor: AccountMonitor | None,
                        exc: MailsyncError) -> AccountMonitor:
        failures = (monitor.failures if monitor else 0) + 1
        now = self._clock()
        log.warning("subscription create/renew failed (%d in a row): %s", failures, exc.code,
                    extra={"error_code": exc.code})
        retry_at = now + timedelta(seconds=retry_backoff_s(failures))
        if isinstance(exc, ReauthRequired):
            retry_at = now + timedelta(seconds=MAX_RETRY_BACKOFF_S)
        fields = AccountMonitor(account_id=account_id,
                                subscription_id=monitor.subscription_id if monitor else None,
                                expires_at=monitor.expires_at if monitor else None,
                                failures=failures, last_error=exc.code, retry_at=retry_at, updated_at=now,
                                etag=monitor.etag if monitor else None)
        try:
            return self._store.save_monitor(fields)
        except Conflict:
            latest = self._store.get_monitor(account_id)
            return latest if latest is not None else fields

    def _save_monitor(self, account_id: str, monitor: AccountMonitor | None, *, subscription_id: str,
                      expires_at: datetime) -> AccountMonitor:
        return self._store.save_monitor(AccountMonitor(
            account_id=account_id, subscription_id=subscription_id, expires_at=expires_at, failures=0,
            last_error=None, retry_at=None, updated_at=self._clock(), etag=monitor.etag if monitor else None))
