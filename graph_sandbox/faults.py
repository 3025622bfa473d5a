"""Seeded fault injection: what goes wrong, how often, reproducibly.

A :class:`FaultPlan` is built from a named profile (``--faults PROFILE``)
and a seed, and can be replaced at run time (``PUT /sandbox/faults``).
It draws from two separate random streams, one for API requests and one
for notifications, so that notification traffic never shifts which
requests fail: the same seed and the same sequence of requests give the
same faults.

Request faults (asked by the mail API, before the handler runs)::

    error_503      503 ServiceUnavailable, half of them with Retry-After
    error_504      504 GatewayTimeout (no Retry-After)
    storm          a 429 storm: every request of that app + mailbox is
                   refused for ``storm_s`` seconds (Retry-After counts down)
    truncate       the body is cut: half with a short Content-Length (bad
                   JSON), half by closing the connection mid-body
    slow           the answer waits ``slow_ms`` before it is sent
    expire_delta   a delta call with a state token answers that its sync state is
                   gone, in one of the forms Outlook uses (410/400 SyncStateNotFound,
                   410 resyncRequired, 400 SyncStateInvalid: sync_states.EXPIRY_ANSWERS)
    duplicate_delta  a delta page's nextLink steps back, so the next page
                   repeats the end of this one (Graph may replay items)

Notification faults (asked by the subscription service)::

    notification_fate()  -> "deliver" | "drop" | "duplicate" | "delay"
    notification_delay_s()   how long a "delay" holds a notification
    should_reorder()         shuffle the batch about to be sent
    lifecycle_missed()       send a ``missed`` lifecycle event instead of
                             the batch (the notifications are dropped)
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from graph_sandbox.sync_states import EXPIRY_ANSWERS


@dataclass(frozen=True)
class FaultRates:
    """Probabilities (0..1) per request / per notification, and durations."""

    error_503: float = 0.0
    error_504: float = 0.0
    storm: float = 0.0
    storm_s: float = 3.0
    truncate: float = 0.0
    slow: float = 0.0
    slow_ms: int = 3000
    expire_delta: float = 0.0
    duplicate_delta: float = 0.0
    notify_drop: float = 0.0
    notify_duplicate: float = 0.0
    notify_delay: float = 0.0
    notify_delay_s: float = 5.0
    notify_reorder: float = 0.0
    lifecycle_missed: float = 0.0


PROFILES: dict[str, FaultRates] = {
    "none": FaultRates(),
    # Transient server errors, as any long sync meets them.
    "flaky": FaultRates(error_503=0.03, error_504=0.02, truncate=0.01, slow=0.01, slow_ms=2000),
    # Bursts of 429 for a few seconds: tests Retry-After handling.
    "throttle-storm": FaultRates(storm=0.02, storm_s=3.0),
    "truncate": FaultRates(truncate=0.05),
    "slow": FaultRates(slow=0.05, slow_ms=3000),
    # Sync states that vanish: the client must restart the folder.
    "expire-delta": FaultRates(expire_delta=0.1, duplicate_delta=0.1),
    # Webhooks that misbehave: lost, doubled, late, out of order, missed.
    "lossy-notifications": FaultRates(notify_drop=0.1, notify_duplicate=0.1, notify_delay=0.1,
                                      notify_delay_s=5.0, notify_reorder=0.3, lifecycle_missed=0.05),
    # Everything at once, at rates a robust engine must still converge under.
    "chaos": FaultRates(error_503=0.03, error_504=0.02, storm=0.01, storm_s=2.0, truncate=0.02, slow=0.01,
                        slow_ms=1500, expire_delta=0.03, duplicate_delta=0.05, notify_drop=0.1,
                        notify_duplicate=0.1, notify_delay=0.1, notify_delay_s=3.0, notify_reorder=0.3,
                        lifecycle_missed=0.03),
}


@dataclass(frozen=True)
class RequestFault:
    """What to do to one request instead of (or on top of) answering it."""

    kind: str                          # error | storm | truncate | slow | expire_delta
    status: int = 0
    code: str = ""
    message: str = ""
    retry_after_s: int | None = None
    delay_ms: int = 0
    cut: str = ""                      # truncate: "length" (bad JSON) | "connection"


class FaultPlan:
    """A named, seeded fault profile (see the module docstring)."""

    def __init__(self, profile: str = "none", *, seed: int = 0, **overrides: Any) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown fault profile {profile!r}; known: {', '.join(PROFILES)}")
        known = {f.name for f in fields(FaultRates)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}")
        rates = replace(PROFILES[profile], **overrides)
        for f in fields(rates):
            value = getattr(rates, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"fault setting {f.name} must be a non-negative number")
            if not f.name.endswith(("_s", "_ms")) and value > 1:
                raise ValueError(f"fault setting {f.name} is a probability (0..1)")
        self.profile = profile
        self.seed = seed
        self.rates = rates
        self._requests = random.Random(f"requests:{seed}")
        self._notifications = random.Random(f"notifications:{seed}")
        self._storms: dict[tuple[str, str], float] = {}     # key -> storm end (monotonic)
        self.injected = 0

    @property
    def active(self) -> bool:
        return any(getattr(self.rates, f.name) for f in fields(FaultRates)
                   if not f.name.endswith(("_s", "_ms")))

    def describe(self) -> dict[str, Any]:
        return {"profile": self.profile, "seed": self.seed, "rates": asdict(self.rates),
                "profiles": sorted(PROFILES)}

    # -- requests ---------------------------------------------------------

    def request_fault(self, key: tuple[str, str], now: float, *, delta_with_token: bool) -> RequestFault | None:
        """The fault for one mail API request, or None. ``now`` is monotonic seconds."""
        rates, rng = self.rates, self._requests
        storm_end = self._storms.get(key)
        if storm_end is not None:
            if now < storm_end:
                return self._count(RequestFault("storm", 429, "ApplicationThrottled",
                                                "Application is over its MailboxConcurrency limit.",
                                                max(1, math.ceil(storm_end - now))))
            del self._storms[key]
        if not self.active:
            return None
        roll = rng.random()
        if roll < rates.storm:
            self._storms[key] = now + rates.storm_s
            return self._count(RequestFault("storm", 429, "ApplicationThrottled",
                                            "Application is over its MailboxConcurrency limit.",
                                            max(1, math.ceil(rates.storm_s))))
        roll -= rates.storm
        if roll < rates.error_503:
            retry = rng.choice((None, rng.randint(1, 5)))
            return self._count(RequestFault("error", 503, "ServiceUnavailable",
                                            "The service is temporarily unavailable. Please retry later.", retry))
        roll -= rates.error_503
        if roll < rates.error_504:
            return self._count(RequestFault("error", 504, "GatewayTimeout",
                                            "The gateway did not receive a response in time."))
        roll -= rates.error_504
        if delta_with_token:
            if roll < rates.expire_delta:
                # Every form Outlook answers a lost sync state with, not only the first.
                status, code, message = rng.choice(EXPIRY_ANSWERS)
                return self._count(RequestFault("expire_delta", status, code, message))
            roll -= rates.expire_delta
        if roll < rates.truncate:
            return self._count(RequestFault("truncate", cut=rng.choice(("length", "connection"))))
        roll -= rates.truncate
        if roll < rates.slow:
            return self._count(RequestFault("slow", delay_ms=rates.slow_ms))
        return None

    def replay_delta_page(self) -> bool:
        """Should this delta page's nextLink step back so items are sent twice?"""
        return self.rates.duplicate_delta > 0 and self._requests.random() < self.rates.duplicate_delta

    def _count(self, fault: RequestFault) -> RequestFault:
        self.injected += 1
        return fault

    # -- notifications ------------------------------------------------------

    def notification_fate(self, rng: random.Random | None = None) -> str:
        """"deliver" | "drop" | "duplicate" | "delay" for one notification."""
        r = (rng or self._notifications).random()
        rates = self.rates
        if r < rates.notify_drop:
            return "drop"
        r -= rates.notify_drop
        if r < rates.notify_duplicate:
            return "duplicate"
        r -= rates.notify_duplicate
        if r < rates.notify_delay:
            return "delay"
        return "deliver"

    def notification_delay_s(self, rng: random.Random | None = None) -> float:
        """How long a delayed notification is held (0.5x .. 1.5x ``notify_delay_s``)."""
        return self.rates.notify_delay_s * (0.5 + (rng or self._notifications).random())

    def should_reorder(self, rng: random.Random | None = None) -> bool:
        return (rng or self._notifications).random() < self.rates.notify_reorder

    def lifecycle_missed(self, rng: random.Random | None = None) -> bool:
        """Replace a batch by a ``missed`` lifecycle event?"""
        return (rng or self._notifications).random() < self.rates.lifecycle_missed

    def shuffle(self, items: list[Any], rng: random.Random | None = None) -> None:
        """Reorder ``items`` in place (seeded)."""
        (rng or self._notifications).shuffle(items)
