"""How long Outlook keeps delta state, how late delta sees a change, and replays.

The three ways real Outlook's delta query is less forgiving than a naive
server, each on by default and configurable (``SandboxConfig``):

Token cache (``delta_token_cache``, default 3)
----------------------------------------------
Microsoft, delta query overview, "token duration": for Outlook entities
"the upper limit is not fixed; it's dependent on the size of the internal
delta token cache. While new delta tokens are continuously added in the
cache, after the cache capacity is exceeded, the older delta tokens are
deleted". What that looks like on the wire was reported in
microsoft-graph-docs #2162 (message delta, nextLinks) and #2350
(calendarView delta, HTTP 410 Gone)::

    {"code": "SyncStateNotFound",
     "message": "The sync state generation is not found; generation=518;[highest=523][523][521][522]."}

Every answer of a delta round issues a new *generation* of the sync state
of that folder (one counter per app, mailbox and folder; ``mailFolders/
delta`` counts as a folder of its own); the cache keeps the newest N. A
link whose generation is older than the newest N answers the error above.
A client that reads pages ahead and then resumes from an older link than
the newest it was given is exactly what this catches. A zero capacity
switches the cache off.

The status: the reports for Outlook show 410 Gone; the docs only promise "a
40X-series error with error codes such as syncStateNotFound", and directory
resources answer 400 with the same code. ``delta_expired_status`` (410 or
400) picks it, so a client can be tested against both; the client must look
at the code.

Lag (``delta_lag_s``)
---------------------
"A change may only show up if you retry the nextLink or deltaLink after
some time": a change is visible to delta ``delta_lag_s`` seconds after it
was made (notifications are not delayed, which is the trap: the round a
notification triggers may not see its change yet). Implemented by bounding
a round with the newest change old enough to be seen, so a message that
changed twice shows its latest state only once that is visible, never a
mix.

Replays (``delta_replay_rate``)
-------------------------------
"Be prepared for replays": with this probability a page's nextLink steps
back so the next page repeats the end of this one (the same mechanism as
the ``duplicate_delta`` fault, drawn from its own seeded stream).
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_right
from dataclasses import dataclass

SYNC_STATE_NOT_FOUND = "SyncStateNotFound"
RESYNC_REQUIRED = "resyncRequired"
SYNC_STATE_INVALID = "SyncStateInvalid"

# (status, code, message) Outlook answers for a sync state it no longer has.
# The fault ``expire_delta`` picks one of these, so a client meets every
# form a real mailbox can produce, not only the first.
EXPIRY_ANSWERS: tuple[tuple[int, str, str], ...] = (
    (410, SYNC_STATE_NOT_FOUND, "The sync state generation is not found."),
    (400, SYNC_STATE_NOT_FOUND, "The sync state generation is not found. The delta token is expired and data "
                                "must be synchronized again."),
    (410, RESYNC_REQUIRED, "Resync required. Replace any local cached data with the results of a full sync."),
    (400, SYNC_STATE_INVALID, "The sync state is invalid."),
)

StateKey = tuple[str, str, str]   # (app id, user id, folder id or "" for the folder list)


@dataclass(frozen=True)
class Evicted:
    """A link older than the cache holds: what to answer."""

    generation: int
    highest: int
    kept: tuple[int, ...]

    @property
    def message(self) -> str:
        kept = "".join(f"[{g}]" for g in self.kept)
        return f"The sync state generation is not found; generation={self.generation};[highest={self.highest}]{kept}."


class TokenCache:
    """The newest ``capacity`` generations of every sync state (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._highest: dict[StateKey, int] = {}

    def issue(self, key: StateKey) -> int:
        """A new generation for a link about to be sent."""
        generation = self._highest.get(key, 0) + 1
        self._highest[key] = generation
        return generation

    def export_state(self) -> dict[StateKey, int]:
        return dict(self._highest)

    def import_state(self, highest: dict[StateKey, int]) -> None:
        self._highest = dict(highest)

    def check(self, key: StateKey, generation: int) -> Evicted | None:
        """None while ``generation`` is cached; else what the eviction looks like."""
        if self.capacity <= 0 or generation <= 0:
            return None   # cache off, or a token from before generations were counted
        highest = self._highest.get(key, 0)
        if generation > highest - self.capacity:
            return None
        kept = tuple(g for g in range(highest, highest - self.capacity, -1) if g > 0)
        return Evicted(generation, highest, kept)


class ChangeClock:
    """When each change of a mailbox happened (seq n at ``times[n - 1]``), for delta's lag."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times = array("q")

    def record(self, seq: int, now_ms: int) -> None:
        # Seqs come one at a time; the wall clock may step back a little, delta must not.
        if self._times and now_ms < self._times[-1]:
            now_ms = self._times[-1]
        while len(self._times) < seq:
            self._times.append(now_ms)

    def settle(self) -> None:
        """Every change so far is old (a seeded mailbox has always been like this)."""
        self._times = array("q", bytes(len(self._times) * self._times.itemsize))

    def visible(self, now_ms: int, lag_ms: int, newest: int) -> int:
        """The newest seq delta may show at ``now_ms`` (changes younger than the lag wait)."""
        if lag_ms <= 0:
            return newest
        return min(newest, bisect_right(self._times, now_ms - lag_ms))


class DeltaBehaviour:
    """The token cache, the replay stream and the restart counts of one sandbox."""

    def __init__(self, capacity: int, *, replay_rate: float, seed: int) -> None:
        self.cache = TokenCache(capacity)
        self.replay_rate = replay_rate
        self._replays = random.Random(f"replays:{seed}")
        self._gone: set[StateKey] = set()

    def configure(self, capacity: int, replay_rate: float) -> None:
        self.cache.capacity = capacity
        self.replay_rate = replay_rate

    def gone(self, key: StateKey) -> None:
        """The client was told this state's link is gone (evicted, expired, invalidated)."""
        self._gone.add(key)

    def round_started(self, key: StateKey) -> bool:
        """A delta call without a token; True when it follows a "gone" answer: a full restart forced
        by the lost state (a client starting over for its own reasons is not counted)."""
        forced = key in self._gone
        self._gone.discard(key)
        return forced

    def forget(self) -> None:
        """Counters were reset: earlier answers no longer count."""
        self._gone.clear()

    def replay(self) -> bool:
        return self.replay_rate > 0 and self._replays.random() < self.replay_rate
