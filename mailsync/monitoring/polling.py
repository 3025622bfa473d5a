"""Polling fallback: incremental sync on a timer, spread evenly over the interval.

Who is polled, and how often:

* every watched account at ``POLL_INTERVAL_S`` when webhooks cannot work
  (``PUBLIC_BASE_URL`` is not a public HTTPS URL and Graph is the real one),
  or when the account has no healthy subscription (never created, creation
  or renewal failing, expired);
* every other watched account at ``POLL_INTERVAL_SUBSCRIBED_S`` (a safety
  sweep, default 6 h): notifications can be lost without a ``missed``
  event, and message subscriptions say nothing about folders being
  renamed or created.

Spreading: each account gets a fixed offset in the interval, from a hash
of its id (stable across processes, unlike ``hash()``). The timer fires
every ``POLL_TICK_S``; each tick enqueues one SYNC_ACCOUNT job for the
accounts whose due time falls inside the *following* tick, with a queue
visibility delay that lands it on that time. 10,000 accounts every 15
minutes become about 11 jobs a second, evenly, not 10,000 at once; and
each tick's scan only enqueues ``tick / interval`` of the accounts.

A tick the host skips loses those accounts' poll for one interval; a tick
run twice enqueues their job twice (harmless: jobs are idempotent).

Each tick first asks ``StoreWatch`` whether the search store was recreated
(mailsync.monitoring.store_watch): a lost store is noticed within one tick
even when no mailbox changes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from mailsync.errors import MailsyncError
from mailsync.jobs import JobKind, new_job
from mailsync.monitoring.records import AccountDirectory, AccountMonitor, SubscriptionKind, SubscriptionStore
from mailsync.monitoring.store_watch import StoreWatch
from mailsync.monitoring.subscriptions import WATCHED_STATUSES, webhooks_enabled
from mailsync.ports import JobQueue
from mailsync.settings import Settings

log = logging.getLogger("mailsync.monitoring.polling")


def offset_s(account_id: str, interval_s: int) -> int:
    """The account's fixed slot in the interval (uniform, stable across processes)."""
    digest = hashlib.sha256(account_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % interval_s


def due_delay(account_id: str, interval_s: int, tick_s: int, now_s: float) -> float | None:
    """Seconds from ``now_s`` to the account's due time if this tick schedules it, else None.

    The account is due at every ``k * interval + offset``. A tick firing
    near the boundary ``b`` (within half a tick, either side: timers are
    late or early by a little) schedules the *next* window ``[b + tick,
    b + 2 * tick)``. Scheduling ahead means a late timer never bunches the
    accounts it is late for into one burst, and rounding to the nearest
    boundary means a timer that fires slightly early or late neither skips
    a window nor schedules one twice.
    """
    interval = max(interval_s, tick_s)
    window_start = round(now_s / tick_s) * tick_s + tick_s
    due = window_start + (offset_s(account_id, interval) - window_start) % interval
    if due >= window_start + tick_s:
        return None
    return max(0.0, due - now_s)


@dataclass(frozen=True)
class PollReport:
    polled: int = 0       # accounts enqueued at the fallback interval
    swept: int = 0        # accounts enqueued at the safety-sweep interval
    watched: int = 0
    resynced: int = 0     # accounts enqueued because the store was recreated


class PollScheduler:
    """The poll_scheduler timer's use case."""

    def __init__(self, settings: Settings, accounts: AccountDirectory, subscriptions: SubscriptionStore,
                 queue: JobQueue, *, store_watch: StoreWatch | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._settings = settings
        self._store_watch = store_watch
        self._accounts = accounts
        self._subscriptions = subscriptions
        self._queue = queue
        self._clock = clock
        self._webhooks = webhooks_enabled(settings)

    def needs_polling(self, monitor: AccountMonitor | None, now: datetime) -> bool:
        return not self._webhooks or monitor is None or not monitor.healthy(now)

    def _check_store(self) -> int:
        if self._store_watch is None:
            return 0
        try:
            return self._store_watch.check()
        except MailsyncError as exc:
            # The store or the table is down: polling goes on; the next tick checks again.
            log.warning("store generation not checked: %s", exc)
            return 0

    def tick(self) -> PollReport:
        resynced = self._check_store()
        now = self._clock()
        now_s = now.timestamp()
        tick_s = self._settings.poll_tick_s
        # The messages subscription decides: without it changes go unseen. A failing
        # folder subscription only delays folder renames until the sweep.
        monitors = ({m.account_id: m for m in self._subscriptions.monitors() if m.kind is SubscriptionKind.MESSAGES}
                    if self._webhooks else {})
        polled = swept = watched = 0
        for account in self._accounts.iter_accounts():
            if account.status not in WATCHED_STATUSES:
                continue
            watched += 1
            fallback = self.needs_polling(monitors.get(account.account_id), now)
            interval = self._settings.poll_interval_s if fallback else self._settings.poll_interval_subscribed_s
            if interval <= 0:
                continue
            delay = due_delay(account.account_id, interval, tick_s, now_s)
            if delay is None:
                continue
            reason = "poll" if fallback else "sweep"
            self._queue.enqueue(new_job(JobKind.SYNC_ACCOUNT, account.account_id, reason=reason), delay_s=delay)
            if fallback:
                polled += 1
            else:
                swept += 1
        report = PollReport(polled=polled, swept=swept, watched=watched, resynced=resynced)
        log.info("poll tick: %d polled, %d swept of %d watched accounts (%d resynced: store recreated)",
                 polled, swept, watched, resynced)
        return report
