"""Configuration of one Graph sandbox instance.

A frozen dataclass built by the CLI (``python -m graph_sandbox``), by tests
(``SandboxConfig(users=2, ...)``) or changed at run time through the admin
API (``dataclasses.replace``). Nothing else in the sandbox reads the
environment or the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

# Outlook's well-known default for `Prefer: odata.maxpagesize` on message
# delta is 10. No public source states a maximum for messages (Microsoft
# documents 200 for directory objects, 1000 for `$top` on message lists),
# so we cap at 500 and say so in docs/graph-sandbox.md.
DEFAULT_PAGE_SIZE = 10
MAX_DELTA_PAGE_SIZE = 500
MAX_TOP = 1000

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate_limit(text: str) -> tuple[int, float]:
    """Parse ``N/window`` (``10000/600``, ``10000/10m``, ``50/1s``) into (requests, seconds)."""
    match = _RATE_RE.match(text)
    if not match:
        raise ValueError(f"rate limit must look like 10000/10m or 100/60 (requests/window), not {text!r}")
    requests = int(match.group(1))
    window_s = float(match.group(2)) * _UNIT_S[match.group(3)]
    if requests < 1 or window_s <= 0:
        raise ValueError(f"rate limit needs at least 1 request in a positive window, not {text!r}")
    return requests, window_s


@dataclass(frozen=True)
class SandboxConfig:
    """Everything one sandbox instance is built from.

    ``seed`` alone decides the tenant, users and mailboxes: the same seed,
    ``users`` and ``messages_per_user`` always give the same data, ids
    included. ``anchor`` is the "now" the seeded mail is dated back from,
    fixed so that data does not depend on the day the sandbox runs.
    """

    host: str = "127.0.0.1"
    port: int = 7081
    seed: int = 42
    users: int = 3
    messages_per_user: int = 200
    anchor: datetime = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
    # The network round trip, paid once per HTTP request (a $batch too: once for the whole envelope). A
    # plain request holds its mailbox concurrency slot through it (the sandbox's stand-in for its time at
    # Outlook); the items of a $batch hold a slot for ``execution_ms`` each, as Outlook executes them.
    latency_ms: int = 0
    execution_ms: int = 0
    faults: str = "none"
    fault_seed: int | None = None                 # None: derived from seed
    access_token_lifetime_s: int = 3600
    # Identity platform (identity.py): Entra's defaults.
    refresh_token_lifetime_s: int = 90 * 24 * 3600
    auth_code_lifetime_s: int = 600
    single_use_refresh_tokens: bool = False       # Entra keeps old refresh tokens valid; True is stricter
    # Change notifications (subscriptions.py, notifications.py): Graph's numbers.
    subscription_max_minutes: int = 4230          # Outlook messages
    subscription_min_minutes: int = 45            # Outlook raises shorter requests to this
    validation_timeout_s: float = 10.0
    notification_timeout_s: float = 3.0
    notification_retry_base_s: float = 2.0
    notification_retry_cap_s: float = 600.0
    notification_retry_window_s: float = 4 * 3600.0
    notification_max_parallel: int = 32           # POSTs in flight at once, over all subscriptions
    reauthorize_before_s: float = 900.0
    # While a reauthorizationRequired challenge is unanswered, Graph holds the
    # subscription's change notifications and repeats the event "every few minutes".
    reauthorize_repeat_s: float = 180.0
    # Graph only calls https webhooks. A local stack serves http on loopback, so
    # the sandbox accepts http://127.0.0.1|localhost|[::1] URLs only when this is set.
    allow_http_loopback_webhooks: bool = False
    # Where the sandbox keeps its state between runs (graph_sandbox/persistence.py);
    # None: in memory only (tests).
    state_path: str | None = None
    rate_limit_requests: int = 10_000             # per app + mailbox ...
    rate_limit_window_s: float = 600.0            # ... per this window
    max_concurrency: int = 4                      # per app + mailbox
    concurrency_retry_after_s: int = 1
    delta_token_ttl_s: float = 7 * 24 * 3600.0    # a sync state older than this is gone (410)
    # Outlook's delta, less forgiving than a naive server (graph_sandbox/sync_states.py):
    delta_token_cache: int = 3                    # newest generations kept per folder state (0: off)
    delta_expired_status: int = 410               # status of an evicted link (410 as reported; 400 allowed)
    delta_lag_s: float = 1.0                      # a change shows in delta this long after it was made
    delta_replay_rate: float = 0.02               # chance a page's nextLink steps back (items replayed)
    search_folders: int = 1                       # mailSearchFolders seeded per mailbox (0..2)
    search_folder_idle_days: float = 45.0         # Exchange deletes a search folder unused this long
    default_page_size: int = DEFAULT_PAGE_SIZE
    max_delta_page_size: int = MAX_DELTA_PAGE_SIZE
    public_url: str | None = None                 # base URL put in links; default: the request's origin

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError("users must be at least 1")
        if self.messages_per_user < 0:
            raise ValueError("messages_per_user must not be negative")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must not be negative")
        if self.execution_ms < 0:
            raise ValueError("execution_ms must not be negative")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.rate_limit_requests < 1 or self.rate_limit_window_s <= 0:
            raise ValueError("rate limit needs at least 1 request in a positive window")
        if self.access_token_lifetime_s < 1:
            raise ValueError("access_token_lifetime_s must be positive")
        if self.delta_token_ttl_s <= 0:
            raise ValueError("delta_token_ttl_s must be positive")
        if self.delta_token_cache < 0:
            raise ValueError("delta_token_cache must not be negative (0 switches the cache off)")
        if self.delta_expired_status not in (400, 410):
            raise ValueError("delta_expired_status must be 400 or 410")
        if self.delta_lag_s < 0:
            raise ValueError("delta_lag_s must not be negative")
        if not 0 <= self.delta_replay_rate <= 1:
            raise ValueError("delta_replay_rate is a probability (0..1)")
        if not 0 <= self.search_folders <= 2:
            raise ValueError("search_folders must be between 0 and 2")
        if self.search_folder_idle_days <= 0:
            raise ValueError("search_folder_idle_days must be positive")
        if not 1 <= self.default_page_size <= self.max_delta_page_size:
            raise ValueError("default_page_size must be between 1 and max_delta_page_size")
        if not 0 < self.subscription_min_minutes <= self.subscription_max_minutes:
            raise ValueError("subscription_min_minutes must be positive and at most subscription_max_minutes")
        if self.reauthorize_repeat_s <= 0:
            raise ValueError("reauthorize_repeat_s must be positive")
        if self.anchor.tzinfo is None:
            raise ValueError("anchor must be timezone-aware")

    @property
    def effective_fault_seed(self) -> int:
        return self.seed if self.fault_seed is None else self.fault_seed

    def with_changes(self, **changes: Any) -> SandboxConfig:
        """A copy with ``changes`` applied; unknown names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return replace(self, **changes)

    def runtime_view(self) -> dict[str, Any]:
        """The settings as JSON-able values (for the admin API)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out
