"""The whole mutable world of one sandbox: tenant, users, mailboxes, clock.

Everything is built from :class:`SandboxConfig` and is deterministic from
its seed. All mutation happens on the server's event-loop thread (aiohttp
handlers and the subscription loop), so nothing here takes locks.

Other parts of the sandbox hang off this object:

- ``state.mailboxes``: the :class:`~graph_sandbox.mailbox.Mailboxes` registry
  (``add_listener`` for change notifications, ``send_mail`` across users);
- ``state.faults``: the seeded :class:`~graph_sandbox.faults.FaultPlan`;
- ``state.throttle``: per app + mailbox limits;
- ``state.clock``: real time plus an offset the admin API can advance, so
  tests can expire tokens and sync states without sleeping;
- grants: ``revoke_grant`` / ``grant_revoked`` (the identity platform refuses
  refresh tokens and access tokens of a revoked user+app).
"""

from __future__ import annotations

import gc
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from graph_sandbox.config import SandboxConfig
from graph_sandbox.faults import FaultPlan
from graph_sandbox.mailbox import Mailbox, Mailboxes
from graph_sandbox.seed import seed_tenant
from graph_sandbox.sync_states import DeltaBehaviour
from graph_sandbox.throttle import Throttle

log = logging.getLogger("graph_sandbox")

ALL_APPS = "*"


class SandboxClock:
    """Wall-clock time plus an adjustable offset (never goes backwards)."""

    def __init__(self) -> None:
        self._offset_s = 0.0

    @property
    def offset_s(self) -> float:
        return self._offset_s

    def time(self) -> float:
        """Seconds since the epoch, as the sandbox sees them."""
        return time.time() + self._offset_s

    def time_ms(self) -> int:
        return int(self.time() * 1000)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), tz=UTC)

    def monotonic(self) -> float:
        """For intervals (throttle windows, storms): monotonic plus the same offset."""
        return time.monotonic() + self._offset_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        self._offset_s += seconds


@dataclass(frozen=True)
class SandboxUser:
    """One user of the sandbox tenant (and the owner of one mailbox)."""

    id: str
    index: int
    display_name: str
    given_name: str
    surname: str
    mail: str
    user_principal_name: str
    job_title: str
    office_location: str
    business_phones: tuple[str, ...] = ()
    mobile_phone: str | None = None
    preferred_language: str = "en-US"


@dataclass
class Counters:
    """What the sandbox served, for the admin API and the benchmarks."""

    requests: int = 0          # every /v1.0 request
    served: int = 0            # answered 2xx
    throttled: int = 0         # 429, whatever the cause
    faults_injected: int = 0   # answers decided by the fault plan
    delta_pages: int = 0
    delta_restarts: int = 0    # rounds started from scratch after a "sync state gone" answer (full restarts)
    delta_expired: int = 0     # delta calls answered "sync state gone" (evicted, expired, invalidated, faults)
    by_status: dict[int, int] = field(default_factory=dict)

    def record(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if 200 <= status < 300:
            self.served += 1
        elif status == 429:
            self.throttled += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "served": self.served,
            "throttled": self.throttled,
            "faultsInjected": self.faults_injected,
            "deltaPages": self.delta_pages,
            "deltaRestarts": self.delta_restarts,
            "deltaExpired": self.delta_expired,
            "byStatus": {str(k): v for k, v in sorted(self.by_status.items())},
        }


class SandboxState:
    """The tenant, its users and mailboxes, and the run-time knobs."""

    def __init__(self, config: SandboxConfig) -> None:
        self.clock = SandboxClock()
        self.base_url: str | None = None        # set by the server once bound
        self._reset_listeners: list[Callable[[SandboxState], None]] = []
        self.mailboxes = Mailboxes(self.clock)
        self._build(config)

    # -- construction / reset ------------------------------------------------

    def _build(self, config: SandboxConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.epoch = getattr(self, "epoch", 0) + 1
        self.tenant_id = str(uuid.UUID(int=random.Random(f"tenant:{config.seed}").getrandbits(128), version=4))
        tenant = seed_tenant(config, self.mailboxes)
        self.tenant_domain: str = tenant.domain
        self.users: dict[str, SandboxUser] = {u.id: u for u in tenant.users}
        self._by_address = {u.mail.lower(): u for u in tenant.users}
        self._by_address.update({u.user_principal_name.lower(): u for u in tenant.users})
        self.mailboxes.replace_all(tenant.mailboxes, epoch=self.epoch)
        if config.users * config.messages_per_user >= 20_000:
            # Millions of long-lived seeded objects: keep them out of the cycle
            # collector, or every full collection stalls a request for 100+ ms.
            gc.collect()
            gc.freeze()
        self.counters = Counters()
        self.throttle = Throttle(
            self.clock,
            max_concurrency=config.max_concurrency,
            limit=config.rate_limit_requests,
            window_s=config.rate_limit_window_s,
            retry_after_s=config.concurrency_retry_after_s,
        )
        self.faults = FaultPlan(config.faults, seed=config.effective_fault_seed)
        self.delta = DeltaBehaviour(config.delta_token_cache, replay_rate=config.delta_replay_rate, seed=config.seed)
        self._revoked: set[tuple[str, str]] = set()
        # 32 bytes that sign delta tokens; from the seed so tokens are reproducible.
        self.token_key = random.Random(f"delta-key:{config.seed}").randbytes(32)

    def reset(self, config: SandboxConfig | None = None) -> None:
        """Rebuild everything from ``config`` (default: the current one).

        Listeners registered with ``mailboxes.add_listener`` and
        ``add_reset_listener`` survive; all delta tokens issued before are
        gone (410), as after a mailbox restore.
        """
        self._build(config or self.config)
        for listener in list(self._reset_listeners):
            try:
                listener(self)
            except Exception:  # a broken listener must not break the reset
                log.exception("reset listener failed")

    def add_reset_listener(self, listener: Callable[[SandboxState], None]) -> None:
        self._reset_listeners.append(listener)

    def apply_runtime(self, **changes: Any) -> SandboxConfig:
        """Change knobs that do not need new data: latency, limits, faults, TTLs."""
        config = self.config.with_changes(**changes)
        self.config = config
        self.throttle.configure(
            max_concurrency=config.max_concurrency,
            limit=config.rate_limit_requests,
            window_s=config.rate_limit_window_s,
            retry_after_s=config.concurrency_retry_after_s,
        )
        self.delta.configure(config.delta_token_cache, config.delta_replay_rate)
        if "faults" in changes or "fault_seed" in changes:
            self.faults = FaultPlan(config.faults, seed=config.effective_fault_seed)
        return config

    # -- users -----------------------------------------------------------------

    def user(self, id_or_address: str) -> SandboxUser | None:
        """A user by object id or address/UPN (case-insensitive), else None."""
        found = self.users.get(id_or_address)
        if found is None:
            found = self.users.get(id_or_address.lower()) or self._by_address.get(id_or_address.lower())
        return found

    def user_by_address(self, address: str) -> SandboxUser | None:
        return self._by_address.get(address.lower())

    def mailbox(self, user_id: str) -> Mailbox:
        return self.mailboxes[user_id]

    # -- consent -------------------------------------------------------------

    def revoke_grant(self, user_id: str, app_id: str | None = None) -> None:
        """The user withdraws consent for ``app_id`` (None: for every app)."""
        self._revoked.add((user_id, app_id or ALL_APPS))

    def restore_grant(self, user_id: str, app_id: str | None = None) -> None:
        if app_id is None:
            self._revoked = {r for r in self._revoked if r[0] != user_id}
        else:
            self._revoked.discard((user_id, app_id))

    def grant_revoked(self, user_id: str, app_id: str) -> bool:
        """True when ``user_id`` withdrew consent for ``app_id`` (or for all apps)."""
        return (user_id, ALL_APPS) in self._revoked or (user_id, app_id) in self._revoked

    def revoked_grants(self) -> list[dict[str, str]]:
        return [{"userId": u, "appId": a} for u, a in sorted(self._revoked)]
