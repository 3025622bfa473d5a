"""Graph lifecycle notifications: keep the subscription alive, catch up after gaps.

Graph POSTs ``{"value": [{"subscriptionId", "clientState",
"lifecycleEvent", ...}]}`` to the subscription's lifecycleNotificationUrl.
Items are authenticated exactly like change notifications, at the same
bounded cost (few distinct subscriptions, rejected at the first unknown one). Nothing slow
happens in the request (Graph wants a quick 2xx; recreating a subscription
makes Graph call our own webhook for the validation handshake): each event
becomes a queue job.

====================== =====================================================
lifecycleEvent         what we do
====================== =====================================================
reauthorizationRequired SUBSCRIPTION job ``renew`` of that subscription: PATCH a
                        new expiration (Graph's documented way to reauthorize
                        and renew in one call; Graph holds the subscription's
                        notifications until it succeeds and repeats the event
                        every few minutes meanwhile; 404 → create)
subscriptionRemoved     SUBSCRIPTION job ``recreate``: a new subscription,
                        then an incremental sync of every folder
missed                  SYNC_ACCOUNT job: incremental sync of the folder list
                        and every folder
====================== =====================================================

Why ``missed`` is an *incremental* sync and not a resync from scratch: a
missed notification loses nothing but the prompt; every folder's delta
cursor still returns all changes since it was saved. Restarting every
folder's delta in a new epoch would re-download the whole mailbox for no
gain. (A delta cursor that really expired comes back as 410 and the engine
resyncs that folder on its own.)
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from mailsync.errors import InputError
from mailsync.jobs import MISSED, JobKind, new_job
from mailsync.models import Job
from mailsync.monitoring.notifications import (
    NotificationAuthenticator,
    UnknownSubscription,
    require_collection,
    subscription_fields,
)
from mailsync.monitoring.records import AccountDirectory, SubscriptionStore
from mailsync.ports import JobQueue

log = logging.getLogger("mailsync.monitoring.lifecycle")


class LifecycleEvent(enum.StrEnum):
    REAUTHORIZATION_REQUIRED = "reauthorizationRequired"
    SUBSCRIPTION_REMOVED = "subscriptionRemoved"
    MISSED = "missed"


@dataclass(frozen=True)
class LifecycleItem:
    subscription_id: str
    client_state: str | None
    event: LifecycleEvent | None       # None: an event we do not know (dropped)


@dataclass(frozen=True)
class LifecycleReport:
    received: int = 0
    accepted: int = 0
    dropped: int = 0
    jobs_enqueued: int = 0
    rejected: bool = False


def parse_lifecycle_notifications(body: Any) -> list[LifecycleItem]:
    """Check the shape of a lifecycle notification collection; InputError rejects it whole."""
    parsed: list[LifecycleItem] = []
    for item in require_collection(body):
        subscription_id, client_state = subscription_fields(item)
        raw = item.get("lifecycleEvent")
        if not isinstance(raw, str):
            raise InputError("every lifecycle notification needs a lifecycleEvent string")
        try:
            event: LifecycleEvent | None = LifecycleEvent(raw)
        except ValueError:
            event = None
        parsed.append(LifecycleItem(subscription_id, client_state, event))
    return parsed


def job_for(event: LifecycleEvent, account_id: str, subscription_id: str) -> Job:
    if event is LifecycleEvent.MISSED:
        return new_job(JobKind.SYNC_ACCOUNT, account_id, reason=MISSED)
    action = "renew" if event is LifecycleEvent.REAUTHORIZATION_REQUIRED else "recreate"
    return new_job(JobKind.SUBSCRIPTION, account_id, reason=event.value,
                   attrs={"action": action, "subscription_id": subscription_id})


class LifecycleReceiver:
    """The lifecycle webhook's use case: authenticate, enqueue one job per (account, event)."""

    def __init__(self, subscriptions: SubscriptionStore, accounts: AccountDirectory, queue: JobQueue) -> None:
        self._subscriptions = subscriptions
        self._accounts = accounts
        self._queue = queue

    def receive(self, body: Any) -> LifecycleReport:
        items = parse_lifecycle_notifications(body)
        auth = NotificationAuthenticator(self._subscriptions, self._accounts)
        # One job per (account, event, subscription): an account has two subscriptions
        # (messages, folders) and Graph batches their events into one POST; each
        # challenge must get its own answer or that subscription stays paused.
        # ``missed`` needs one account sync whichever subscription missed.
        wanted: dict[tuple[str, LifecycleEvent, str], str] = {}
        dropped = 0
        for item in items:
            try:
                subscription = auth.authenticate(item.subscription_id, item.client_state)
            except UnknownSubscription:
                # As for change notifications: stop at the first unknown id (one read per forged request).
                log.warning("rejected a lifecycle request naming an unknown subscription (%d items)", len(items),
                            extra={"received": len(items)})
                return LifecycleReport(received=len(items), dropped=len(items), rejected=True)
            if subscription is None or item.event is None:
                dropped += 1
                continue
            scope = "" if item.event is LifecycleEvent.MISSED else subscription.subscription_id
            wanted[(subscription.account_id, item.event, scope)] = subscription.subscription_id
        if dropped:
            log.warning("dropped %d of %d lifecycle notifications", dropped, len(items),
                        extra={"dropped": dropped, "received": len(items)})
        for (account_id, event, _), subscription_id in wanted.items():
            log.info("lifecycle event %s", event.value, extra={"account_id": account_id,
                                                              "subscription_id": subscription_id})
            self._queue.enqueue(job_for(event, account_id, subscription_id))
        return LifecycleReport(received=len(items), accepted=len(items) - dropped, dropped=dropped,
                               jobs_enqueued=len(wanted))
