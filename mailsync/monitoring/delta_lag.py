"""How long delta lags behind notifications here, learnt from notified rounds: the NOTIFIED job's delay.

Why: a notified round that reads delta before the change shows there misses
the version its notification announced and looks again 2 s later: a queue
message, a partition read, a slot-and-lease take, a finish and a delta
request more (``mailsync.sync.engine``). The Graph sandbox shows a change in
delta 1 s after it was made and notifies at once; on a quiet host a NOTIFIED
job starts ~0.3-0.7 s after its notification, so almost every round came too
early: 2.2 delta pages, 2.64 Graph requests, 8.6 table and 6.8 queue
transactions per change (docs/scaling.md). Enqueueing the job 1 s late
(``NOTIFY_COALESCE_S`` = 1) cut those to 1.30, 1.73, 5.6 and 4.9, and the
latency too (a change no longer waits for a look-again). But a fixed delay
is a guess about the provider: Microsoft documents that delta may lag
changes without a figure, and Graph's own notifications usually arrive
seconds after the change, when delta shows it already; a delay there is
latency for nothing.

So the delay is learnt. Every notified round that knows what it must read
(the versions its notifications carried, ``jobs.Expected``) reports how
long after the newest of its notifications its delta read began and whether it read
them. The delay is the largest age at which one of the recent rounds missed, in
whole seconds (the queue's delays are; ``AzureJobQueue`` rounds up, and a
job starts a few tenths of a second after it shows, so the nearest second,
at least one), at most ``MAX_DELAY_S``: zero while rounds read what they were
told, about the provider's lag once one did not. While the delay holds
rounds past the lag they all read their versions, the misses leave the
window and the delay falls, until a round misses again: about one look-again
per window, instead of one per change. ``NOTIFY_COALESCE_S`` stays a floor.
The webhook's delay runs from a row's first notification; the NOTIFIED job
waits out the same lag for the row's newest one (``mailsync.monitoring.handler``,
"Settling").

Per process (the webhook that enqueues and the worker that runs the rounds
share it: one Function App instance), thread-safe, bounded.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

MAX_DELAY_S = 2.0       # never hold a notification longer than this for delta's sake
WINDOW = 64             # rounds remembered
FORGET_S = 600.0        # a miss older than this says nothing of the provider now


class DeltaLag:
    """The recent notified rounds' outcomes, and the delay they call for."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window: int = WINDOW,
                 max_delay_s: float = MAX_DELAY_S) -> None:
        self._clock = clock
        self._max = max_delay_s
        self._lock = threading.Lock()
        self._rounds: deque[tuple[float, float, bool]] = deque(maxlen=window)   # (when, age, read its versions)

    def observe(self, age_s: float, read_them: bool) -> None:
        """A notified round began its delta read ``age_s`` after its first notification; ``read_them``:
        it read the versions its notifications announced."""
        if age_s < 0:
            age_s = 0.0
        with self._lock:
            self._rounds.append((self._clock(), age_s, read_them))

    def delay_s(self) -> float:
        """How long to hold a NOTIFIED job after its first notification: 0 until a round missed."""
        now = self._clock()
        with self._lock:
            misses = [age for when, age, read_them in self._rounds if not read_them and now - when < FORGET_S]
        if not misses:
            return 0.0
        return min(self._max, float(max(1, round(max(misses)))))
