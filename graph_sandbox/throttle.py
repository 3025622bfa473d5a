"""Outlook's per app + mailbox limits.

Two limits, both keyed by (application id, mailbox):

- **concurrency**: at most ``max_concurrency`` (4) requests in flight; the
  next one is refused at once with 429 ``ApplicationThrottled`` /
  "Application is over its MailboxConcurrency limit." and a short
  ``Retry-After``;
- **rate**: at most ``limit`` (10,000) requests per ``window_s`` (10 min),
  counted in fixed windows that start with the first request; past that,
  429 with ``Retry-After`` = seconds until the window ends.

A refused request does not count against the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxClock

Key = tuple[str, str]   # (app id, mailbox user id)


@dataclass(frozen=True)
class Rejection:
    """Why a request was refused, in Graph's words."""

    code: str
    message: str
    retry_after_s: int
    reason: str          # "concurrency" | "rate" | "storm"


@dataclass
class _Bucket:
    in_flight: int = 0
    window_start: float = 0.0
    count: int = 0


class Throttle:
    """Admission control for the mail API (single event-loop thread: no locks)."""

    def __init__(self, clock: SandboxClock, *, max_concurrency: int = 4, limit: int = 10_000,
                 window_s: float = 600.0, retry_after_s: int = 1) -> None:
        self._clock = clock
        self._buckets: dict[Key, _Bucket] = {}
        self.configure(max_concurrency=max_concurrency, limit=limit, window_s=window_s, retry_after_s=retry_after_s)

    def configure(self, *, max_concurrency: int, limit: int, window_s: float, retry_after_s: int) -> None:
        self.max_concurrency = max_concurrency
        self.limit = limit
        self.window_s = window_s
        self.retry_after_s = retry_after_s

    def try_acquire(self, key: Key) -> Rejection | None:
        """Admit one request for ``key`` (then call :meth:`release`) or say why not."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(window_start=self._clock.monotonic())
        if bucket.in_flight >= self.max_concurrency:
            return Rejection("ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                             self.retry_after_s, "concurrency")
        now = self._clock.monotonic()
        if now - bucket.window_start >= self.window_s:
            bucket.window_start, bucket.count = now, 0
        if bucket.count >= self.limit:
            wait = max(1, math.ceil(bucket.window_start + self.window_s - now))
            return Rejection("ApplicationThrottled", "Application is over its request rate limit.", wait, "rate")
        bucket.count += 1
        bucket.in_flight += 1
        return None

    def release(self, key: Key) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def in_flight(self, key: Key | None = None) -> int:
        if key is not None:
            bucket = self._buckets.get(key)
            return bucket.in_flight if bucket else 0
        return sum(b.in_flight for b in self._buckets.values())

    def snapshot(self) -> list[dict[str, object]]:
        return [
            {"appId": app, "userId": user, "inFlight": b.in_flight, "windowCount": b.count}
            for (app, user), b in sorted(self._buckets.items())
        ]
