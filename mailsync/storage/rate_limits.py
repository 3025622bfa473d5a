"""Per-client token buckets in Azure Tables: rate limits every host process shares.

Table ``<prefix>limits``, one row per rule and client::

    PartitionKey = "<rule>-<sha256(client key)>"   RowKey = "bucket"
    tokens (float), updated_at, full_at (ISO UTC)

A bucket holds up to ``capacity`` tokens and refills at ``capacity`` per
``period_s``; each limited request spends one. A bucket without a row is
full, so a client that never came back costs nothing but a stale row,
which ``purge_idle`` removes once it would be full again (``full_at``).

Why Tables and not memory: the Function App scales out to several
instances and the devhost may run several processes, each with its own
memory; a per-instance limit multiplies by the instance count an attacker
can spread over. A read plus one ETag-conditional write per limited
request (a few milliseconds, fractions of a cent per ten thousand) keeps
one truth. Two spends racing on a bucket: one write wins, the other gets
412, re-reads and decides again (after a short random pause, for up to
three seconds), so a bucket never hands out more tokens than it holds.
The client key is hashed, so the table holds no addresses.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode

from mailsync.errors import RateLimited
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import table_errors

log = logging.getLogger("mailsync.storage.rate_limits")

BUCKET_ROW = "bucket"
# Requests of one client racing on one bucket: each round one write wins and the others re-read,
# after a short random pause so the rounds spread. Twenty at once settle well within this.
_CONTENTION_BUDGET_S = 3.0


@dataclass(frozen=True)
class Rule:
    """``capacity`` requests per ``period_s`` per client, in bursts of up to ``capacity``; 0 turns it off."""

    name: str
    capacity: int
    period_s: float
    message: str   # what the 429 says (the caller's own words are never echoed)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def rate(self) -> float:
        """Tokens regained per second."""
        return self.capacity / self.period_s


def _iso(value: datetime) -> str:
    # Fixed width, so Tables' string comparison in purge_idle orders by time.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


class TableRateLimiter:
    """Token buckets per (rule, client key), shared through one table."""

    def __init__(self, table: RestTable, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._table = table
        self._clock = clock

    def spend(self, rule: Rule, client: str) -> None:
        """Take one token from ``client``'s bucket, or raise RateLimited (nothing spent)."""
        self._decide(rule, client, spend=True)

    def check(self, rule: Rule, client: str) -> None:
        """Raise RateLimited if ``client``'s bucket is empty; spend nothing."""
        self._decide(rule, client, spend=False)

    def purge_idle(self) -> int:
        """Delete buckets that have refilled completely (as good as absent); returns how many."""
        cutoff = _iso(self._clock())
        removed = 0
        with table_errors("purging idle rate-limit buckets"):
            try:
                rows = list(self._table.query_entities("full_at lt @cutoff", parameters={"cutoff": cutoff},
                                                       select=["PartitionKey", "RowKey"]))
            except ResourceNotFoundError:
                return 0
            for row in rows:
                try:
                    self._table.delete_entity(row["PartitionKey"], row["RowKey"])
                    removed += 1
                except HttpResponseError:
                    continue  # spent or removed concurrently
        return removed

    def _decide(self, rule: Rule, client: str, *, spend: bool) -> None:
        if not rule.enabled:
            return
        key = f"{rule.name}-" + hashlib.sha256(client.encode("utf-8")).hexdigest()
        give_up = time.monotonic() + _CONTENTION_BUDGET_S
        attempt = 0
        while time.monotonic() < give_up:
            if attempt:
                time.sleep(random.uniform(0.0, 0.005 * min(attempt, 10)))
            attempt += 1
            now = self._clock()
            with table_errors("reading a rate-limit bucket"):
                try:
                    entity = self._table.get_entity(key, BUCKET_ROW)
                except ResourceNotFoundError:
                    entity = None
            tokens = float(rule.capacity)
            if entity is not None:
                elapsed = max(0.0, (now - datetime.fromisoformat(str(entity["updated_at"]))).total_seconds())
                tokens = min(float(rule.capacity), float(entity["tokens"]) + elapsed * rule.rate)
            if tokens < 1.0:
                raise RateLimited(rule.message, retry_after_s=(1.0 - tokens) / rule.rate, code=rule.name)
            if not spend:
                return
            left = tokens - 1.0
            row = {"PartitionKey": key, "RowKey": BUCKET_ROW, "tokens": left, "updated_at": _iso(now),
                   "full_at": _iso(now + timedelta(seconds=(rule.capacity - left) / rule.rate))}
            with table_errors("spending from a rate-limit bucket"):
                try:
                    if entity is None:
                        self._table.create_entity(row)
                    else:
                        self._table.update_entity(row, mode=UpdateMode.REPLACE, etag=entity.metadata["etag"],
                                                  match_condition=MatchConditions.IfNotModified)
                    return
                except (ResourceExistsError, ResourceModifiedError):
                    continue  # another request spent meanwhile: decide again on the fresh row
        # Several requests of one client racing on one bucket: that is the burst this limits.
        log.warning("rate-limit bucket contended; refusing", extra={"rule": rule.name})
        raise RateLimited(rule.message, retry_after_s=1.0, code=rule.name)
