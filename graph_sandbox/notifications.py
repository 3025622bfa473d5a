"""Change-notification payloads and their delivery to webhooks.

Payloads (the functions the schema test imports)::

    change_notification(...)      one changeNotification for a message change
    folder_change_notification(...) one for a mail folder change (``me/mailFolders``)
    lifecycle_notification(...)   one lifecycle event (reauthorizationRequired,
                                  subscriptionRemoved, missed)
    notification_collection(...)  the {"value": [...]} body that is POSTed

Delivery, per subscription and notification URL (one queue each, at most one
POST in flight each, at most ``notification_max_parallel`` POSTs in flight in
all — Graph's publisher delivers each subscription's notifications on their
own and many subscriptions' at once, so one account's slow or failing POSTs
never hold back another account's)::

    enqueue ──fault plan──> drop | duplicate (queued twice) | delay (held) | deliver
      │
      v
    pending ──(ready)──> batch of up to MAX_BATCH ──fault plan──> reordered?
                                                   └─> "missed" instead?
      │
      POST {"value": [...]}  (3 s timeout, like Graph's publisher)
      ├── 2xx in time ............ delivered
      └── error / non-2xx / slow . back to the front of the queue, retried after
                                   base * 2**attempt seconds (capped), for up to
                                   ``notification_retry_window_s`` (Graph: 4 hours);
                                   then dropped, and a ``missed`` lifecycle event
                                   goes to the lifecycle URL of each subscription hit.

Lifecycle events are never subject to faults (they are how faults are reported).
Backoff waits use the event loop's clock, not the sandbox clock: they are about the
network, not about the mail data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

log = logging.getLogger("graph_sandbox.notifications")

MESSAGE_RESOURCE_TYPE = "#Microsoft.Graph.Message"
FOLDER_RESOURCE_TYPE = "#Microsoft.Graph.MailFolder"
MAX_BATCH = 50
DEFAULT_MAX_PARALLEL = 32
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")


def graph_datetime(epoch_s: float) -> str:
    """Graph's subscription timestamps: UTC with seven fractional digits."""
    moment = datetime.fromtimestamp(epoch_s, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


def message_resource(user_id: str, message_id: str) -> str:
    """The ``resource`` path Graph puts in a message notification."""
    return f"Users/{user_id}/Messages/{message_id}"


def folder_resource(user_id: str, folder_id: str) -> str:
    """The ``resource`` path of a mail folder notification (a ``me/mailFolders`` subscription)."""
    return f"Users/{user_id}/MailFolders/{folder_id}"


def change_notification(*, subscription_id: str, subscription_expiration: float, change_type: str,
                        user_id: str, message_id: str, tenant_id: str, client_state: str | None,
                        etag: str | None = None) -> dict[str, Any]:
    """One ``changeNotification`` for a message (no resource data: Outlook sends ids only)."""
    return _notification(subscription_id=subscription_id, subscription_expiration=subscription_expiration,
                         change_type=change_type, resource=message_resource(user_id, message_id),
                         odata_type=MESSAGE_RESOURCE_TYPE, item_id=message_id, tenant_id=tenant_id,
                         client_state=client_state, etag=etag)


def folder_change_notification(*, subscription_id: str, subscription_expiration: float, change_type: str,
                               user_id: str, folder_id: str, tenant_id: str,
                               client_state: str | None) -> dict[str, Any]:
    """One ``changeNotification`` for a mail folder created, renamed, moved or deleted."""
    return _notification(subscription_id=subscription_id, subscription_expiration=subscription_expiration,
                         change_type=change_type, resource=folder_resource(user_id, folder_id),
                         odata_type=FOLDER_RESOURCE_TYPE, item_id=folder_id, tenant_id=tenant_id,
                         client_state=client_state, etag=None)


def _notification(*, subscription_id: str, subscription_expiration: float, change_type: str, resource: str,
                  odata_type: str, item_id: str, tenant_id: str, client_state: str | None,
                  etag: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"@odata.type": odata_type, "@odata.id": resource}
    if etag is not None:
        data["@odata.etag"] = etag
    data["id"] = item_id
    out: dict[str, Any] = {
        # Every changeNotification has its own id (a GUID); a redelivery of the
        # same notification carries the same one, so receivers can de-duplicate.
        "id": str(uuid.uuid4()),
        "subscriptionId": subscription_id,
        "subscriptionExpirationDateTime": graph_datetime(subscription_expiration),
        "changeType": change_type,
        "resource": resource,
        "resourceData": data,
    }
    if client_state is not None:
        out["clientState"] = client_state
    out["tenantId"] = tenant_id
    return out


def lifecycle_notification(*, subscription_id: str, subscription_expiration: float, event: str,
                           tenant_id: str, client_state: str | None) -> dict[str, Any]:
    """One lifecycle notification, shaped as Microsoft documents it."""
    if event not in LIFECYCLE_EVENTS:
        raise ValueError(f"unknown lifecycle event {event!r}")
    out: dict[str, Any] = {
        "subscriptionId": subscription_id,
        "subscriptionExpirationDateTime": graph_datetime(subscription_expiration),
        "tenantId": tenant_id,
    }
    if client_state is not None:
        out["clientState"] = client_state
    out["lifecycleEvent"] = event
    return out


def notification_collection(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The body Graph POSTs: ``{"value": [changeNotification, ...]}``."""
    return {"value": list(items)}


# ---------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------


@dataclass
class _Item:
    payload: dict[str, Any]
    subscription_id: str
    lifecycle: bool
    ready_at: float = 0.0         # loop time before which it is held (delay fault)
    queued_at: float = 0.0        # loop time it was queued (0: unknown, e.g. restored from a saved state)


@dataclass
class _Endpoint:
    """One subscription's queue towards one URL (its change or its lifecycle URL)."""

    url: str
    pending: deque[_Item] = field(default_factory=deque)
    busy: bool = False
    attempt: int = 0
    failing_since: float | None = None
    next_try_at: float = 0.0


@dataclass
class DeliveryStats:
    posts: int = 0                 # POSTs attempted
    delivered: int = 0             # notifications acknowledged with 2xx
    failed_posts: int = 0          # POSTs that failed, timed out or got non-2xx
    dropped: int = 0               # lost to the fault plan
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    missed_events: int = 0         # "missed" lifecycle events sent
    expired: int = 0               # given up after the retry window
    # Where a notification's time goes (benchmarks divide by ``delivered`` / ``posts``):
    # queued until its POST was answered 2xx, and the POSTs' round trips (the webhook's answer time).
    delivered_wait_ms: float = 0.0
    post_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class DeliveryRecord:
    """One POST as the sandbox saw it (kept for tests and the admin view)."""

    url: str
    count: int
    status: int | None             # None: connection error or timeout
    ok: bool


class Notifier:
    """Queues notifications per URL and delivers them with batching, retries and faults.

    ``missed_event(subscription_id)`` returns ``(lifecycle URL, payload)`` for
    a ``missed`` event about that subscription, or None when it has no
    lifecycle URL; the subscription service provides it.
    """

    def __init__(self, state: Any, *,
                 missed_event: Callable[[str], tuple[str, dict[str, Any]] | None] | None = None,
                 validation_tokens: Callable[[Iterable[str]], list[str]] | None = None) -> None:
        """``validation_tokens(subscription ids)``: the ``validationTokens`` of a POST carrying
        resource data (graph_sandbox.rich_notifications), minted when it is sent."""
        self.state = state
        self._validation_tokens = validation_tokens or (lambda _ids: [])
        self.stats = DeliveryStats()
        self.history: deque[DeliveryRecord] = deque(maxlen=500)
        self._missed_event = missed_event or (lambda _sid: None)
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}   # (url, subscription id) -> its queue
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._in_flight = 0    # POSTs started and not finished (counted here, not from _sends: see _send)

    # -- settings ----------------------------------------------------------------

    def _setting(self, name: str, default: float) -> float:
        return float(getattr(self.state.config, name, default))

    @property
    def timeout_s(self) -> float:
        return self._setting("notification_timeout_s", 3.0)

    @property
    def retry_base_s(self) -> float:
        return self._setting("notification_retry_base_s", 2.0)

    @property
    def retry_cap_s(self) -> float:
        return self._setting("notification_retry_cap_s", 600.0)

    @property
    def retry_window_s(self) -> float:
        return self._setting("notification_retry_window_s", 4 * 3600.0)

    @property
    def max_parallel(self) -> int:
        return max(1, int(self._setting("notification_max_parallel", DEFAULT_MAX_PARALLEL)))

    # -- lifecycle of the loop -------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No proxies from the environment: webhooks are reached directly.
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="graph-sandbox-notifier")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        sends, self._sends = set(self._sends), set()
        for send in sends:
            send.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def clear(self) -> None:
        """Forget everything queued (sandbox reset)."""
        for endpoint in self._endpoints.values():
            endpoint.pending.clear()

    def pending_count(self) -> int:
        return sum(len(e.pending) for e in self._endpoints.values())

    def export_pending(self) -> list[tuple[str, dict[str, Any], str, bool]]:
        """What is queued, as (url, payload, subscription id, lifecycle) (the saved state)."""
        return [(e.url, i.payload, i.subscription_id, i.lifecycle) for e in self._endpoints.values() for i in e.pending]

    def import_pending(self, items: Iterable[tuple[str, dict[str, Any], str, bool]]) -> None:
        """Queue saved notifications again, as they were (faults were applied when first queued)."""
        for url, payload, subscription_id, lifecycle in items:
            endpoint = self._endpoints.get(url)
            if endpoint is None:
                endpoint = self._endpoints[url] = _Endpoint(url)
            endpoint.pending.append(_Item(payload, subscription_id, lifecycle))
        self._wake.set()

    # -- queueing --------------------------------------------------------------------

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def enqueue(self, url: str, payload: dict[str, Any], *, subscription_id: str, lifecycle: bool = False) -> None:
        """Queue one notification for ``url``; faults apply to change notifications only."""
        key = (url, subscription_id)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = _Endpoint(url)
        item = _Item(payload, subscription_id, lifecycle, queued_at=self._loop_time())
        copies = 1
        if not lifecycle:
            faults = self.state.faults
            fate = faults.notification_fate()
            if fate == "drop":
                self.stats.dropped += 1
                return
            if fate == "duplicate":
                self.stats.duplicated += 1
                copies = 2
            elif fate == "delay":
                self.stats.delayed += 1
                item.ready_at = self._loop_time() + faults.notification_delay_s()
        for _ in range(copies):
            endpoint.pending.append(_Item(item.payload, item.subscription_id, item.lifecycle, item.ready_at,
                                          item.queued_at))
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            next_due = self._dispatch()
            timeout = None if next_due is None else max(0.0, next_due - self._loop_time())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _dispatch(self) -> float | None:
        """Start a POST for every endpoint that can send now (up to the parallel cap); return when to look again.

        An endpoint that starts a POST moves to the end of the order, so
        under the cap every subscription gets its turn; one that is idle and
        healthy is forgotten (1,000 subscriptions must not mean 1,000
        entries scanned forever).
        """
        now = self._loop_time()
        next_due: float | None = None
        for key, endpoint in list(self._endpoints.items()):
            if self._in_flight >= self.max_parallel:
                break   # a finishing POST wakes the loop again
            if endpoint.busy:
                continue
            if not endpoint.pending:
                if endpoint.attempt == 0:
                    del self._endpoints[key]
                continue
            if endpoint.next_try_at > now:
                next_due = _earliest(next_due, endpoint.next_try_at)
                continue
            batch = self._take_batch(endpoint, now)
            if not batch:
                held = min(i.ready_at for i in endpoint.pending)
                next_due = _earliest(next_due, held)
                continue
            endpoint.busy = True
            self._in_flight += 1
            self._endpoints[key] = self._endpoints.pop(key)   # to the back of the line
            task = asyncio.create_task(self._send(endpoint, batch))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        return next_due

    def _take_batch(self, endpoint: _Endpoint, now: float) -> list[_Item]:
        batch: list[_Item] = []
        held: list[_Item] = []
        while endpoint.pending and len(batch) < MAX_BATCH:
            item = endpoint.pending.popleft()
            (batch if item.ready_at <= now else held).append(item)
        endpoint.pending.extendleft(reversed(held))
        return batch

    async def _send(self, endpoint: _Endpoint, batch: list[_Item]) -> None:
        try:
            fresh = endpoint.attempt == 0
            changes = [i for i in batch if not i.lifecycle]
            if fresh and changes:
                faults = self.state.faults
                if faults.lifecycle_missed():
                    # The service "loses" these and says so on the lifecycle URL.
                    batch = [i for i in batch if i.lifecycle]
                    self._report_missed({i.subscription_id for i in changes})
                elif len(changes) > 1 and faults.should_reorder():
                    faults.shuffle(batch)
                    self.stats.reordered += 1
            if not batch:
                return
            posted_at = self._loop_time()
            body = notification_collection(i.payload for i in batch)
            if any("encryptedContent" in i.payload for i in batch):
                # Minted per POST (a retry hours later carries fresh ones), one per (app, tenant).
                body["validationTokens"] = self._validation_tokens({i.subscription_id for i in batch})
            ok, status = await self._post(endpoint.url, body)
            self.stats.posts += 1
            self.history.append(DeliveryRecord(endpoint.url, len(batch), status, ok))
            now = self._loop_time()
            self.stats.post_ms += 1000 * (now - posted_at)
            if ok:
                self.stats.delivered += len(batch)
                self.stats.delivered_wait_ms += sum(1000 * (now - i.queued_at) for i in batch if i.queued_at)
                endpoint.attempt = 0
                endpoint.failing_since = None
                endpoint.next_try_at = 0.0
                return
            self.stats.failed_posts += 1
            if endpoint.failing_since is None:
                endpoint.failing_since = now
            if now - endpoint.failing_since >= self.retry_window_s:
                self.stats.expired += len(batch)
                endpoint.attempt = 0
                endpoint.failing_since = None
                self._report_missed({i.subscription_id for i in batch if not i.lifecycle})
                return
            delay = min(self.retry_cap_s, self.retry_base_s * (2 ** min(endpoint.attempt, 20)))
            endpoint.attempt += 1
            endpoint.next_try_at = now + delay
            endpoint.pending.extendleft(reversed(batch))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not stop every other endpoint's delivery
            log.exception("notification delivery to %s failed unexpectedly", endpoint.url)
        finally:
            # Before the wake-up: the loop must see this POST's place free when it looks.
            self._in_flight -= 1
            endpoint.busy = False
            self._wake.set()

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[bool, int | None]:
        try:
            async with self.session.post(
                    url, json=body,
                    headers={"Content-Type": "application/json; charset=utf-8"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as response:
                await response.read()
                return 200 <= response.status < 300, response.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False, None

    def _report_missed(self, subscription_ids: set[str]) -> None:
        for subscription_id in sorted(subscription_ids):
            target = self._missed_event(subscription_id)
            if target is None:
                continue
            url, payload = target
            self.stats.missed_events += 1
            self.enqueue(url, payload, subscription_id=subscription_id, lifecycle=True)


def _earliest(current: float | None, candidate: float) -> float:
    return candidate if current is None else min(current, candidate)
