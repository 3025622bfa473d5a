"""Retries of Storage requests, with the back-off the SDK clients were configured with.

What is retried, as azure-core's and azure-storage's retry policies do: a
request that could not be sent or whose answer could not be read
(refused, reset, timed out), and the answers that mean "try again": 408,
429 and 5xx except 501 and 505. Every method is retried, as the SDK does:
Storage's conditional writes make a replayed write either take effect
once or answer 412/409, which the callers already handle, and a replayed
queue message is one more delivery of a job, which the job protocol
tolerates (at-least-once delivery).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailsync.keepalive_http import ConnectionFailed, Response

NO_RETRY_5XX = (501, 505)


@dataclass(frozen=True)
class RetryPolicy:
    """``total`` retries at most; ``delay_s(n)`` waits before the n-th retry (1-based)."""

    total: int
    delay_s: Callable[[int], float]

    @classmethod
    def exponential(cls, total: int = 10, factor_s: float = 0.8, max_s: float = 120.0) -> RetryPolicy:
        """azure-core's exponential policy (the Tables SDK's default): the first retry at once, then
        ``factor * 2**(n-1)`` seconds, at most ``max_s``."""
        return cls(total, lambda n: 0.0 if n <= 1 else min(max_s, factor_s * 2 ** (n - 1)))

    @classmethod
    def storage_exponential(cls, total: int = 3, initial_s: float = 15.0, base: float = 3.0,
                            jitter_s: float = 3.0) -> RetryPolicy:
        """azure-storage's ``ExponentialRetry``: ``initial + base**k`` seconds (k = retries so far; 0 → ``initial``),
        moved by up to ±``jitter_s``."""
        def delay(n: int) -> float:
            backoff = initial_s + (0 if n <= 1 else base ** (n - 1))
            return max(0.0, random.uniform(backoff - jitter_s, backoff + jitter_s))
        return cls(total, delay)

    def run(self, send: Callable[[], Response], sleep: Callable[[float], None] = time.sleep) -> Response:
        """Call ``send`` until it answers something final or the retries are spent.

        Returns the last answer (a retryable status included, for the caller's
        error); re-raises the last :class:`ConnectionFailed`.
        """
        attempt = 0
        while True:
            try:
                response = send()
            except ConnectionFailed:
                if attempt >= self.total:
                    raise
            else:
                if not _retryable(response.status) or attempt >= self.total:
                    return response
            attempt += 1
            sleep(self.delay_s(attempt))


def _retryable(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status not in NO_RETRY_5XX)
