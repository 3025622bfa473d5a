"""Token buckets in Azurite: limits hold across limiter instances (host processes) and racing requests."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailsync.errors import RateLimited
from mailsync.settings import Settings
from mailsync.storage.rate_limits import Rule, TableRateLimiter
from tests.linking.tables import table_client

RULE = Rule("test_rule", capacity=3, period_s=60.0, message="Slow down.")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def table(storage_settings: Settings):  # type: ignore[no-untyped-def]
    return table_client(storage_settings, "limits")


def test_a_bucket_allows_its_burst_then_refuses_until_it_refills(table) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    limiter = TableRateLimiter(table, clock)
    client = uuid.uuid4().hex
    for _ in range(3):
        limiter.spend(RULE, client)
    with pytest.raises(RateLimited) as info:
        limiter.spend(RULE, client)
    assert info.value.http_status == 429 and info.value.code == "test_rule" and info.value.message == "Slow down."
    assert info.value.retry_after_s == pytest.approx(20.0)   # one token per 20 s
    with pytest.raises(RateLimited):
        limiter.check(RULE, client)
    limiter.spend(RULE, uuid.uuid4().hex)   # other clients are not affected
    clock.now += timedelta(seconds=19)
    with pytest.raises(RateLimited) as info:
        limiter.spend(RULE, client)
    assert info.value.retry_after_s == pytest.approx(1.0)
    clock.now += timedelta(seconds=1)
    limiter.check(RULE, client)
    limiter.spend(RULE, client)
    with pytest.raises(RateLimited):
        limiter.spend(RULE, client)
    assert client not in repr(list(table.list_entities()))   # keys are hashed


def test_check_spends_nothing_and_a_disabled_rule_never_refuses(table) -> None:  # type: ignore[no-untyped-def]
    limiter = TableRateLimiter(table, Clock())
    client = uuid.uuid4().hex
    for _ in range(10):
        limiter.check(RULE, client)
    for _ in range(3):
        limiter.spend(RULE, client)
    off = Rule("off_rule", capacity=0, period_s=60.0, message="never")
    for _ in range(10):
        limiter.spend(off, client)


def test_instances_share_buckets_and_racing_spends_never_exceed_capacity(table) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    # Several "host processes", each its own limiter (and client), on one table.
    limiters = [TableRateLimiter(table, clock) for _ in range(4)]
    client = uuid.uuid4().hex
    rule = Rule("race_rule", capacity=5, period_s=3600.0, message="Slow down.")
    barrier = threading.Barrier(12)
    allowed: list[int] = []
    refused: list[int] = []

    def spend(index: int) -> None:
        barrier.wait()
        try:
            limiters[index % 4].spend(rule, client)
            allowed.append(index)
        except RateLimited:
            refused.append(index)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) <= 5 and len(allowed) + len(refused) == 12
    assert allowed   # contention never refuses everyone
    with pytest.raises(RateLimited):
        for limiter in limiters:
            for _ in range(5):
                limiter.spend(rule, client)


def test_purge_idle_removes_only_full_buckets(table) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    limiter = TableRateLimiter(table, clock)
    idle, busy = uuid.uuid4().hex, uuid.uuid4().hex
    limiter.spend(RULE, idle)                      # full again 20 s later
    clock.now += timedelta(seconds=30)
    for _ in range(3):
        limiter.spend(RULE, busy)                  # full again 60 s later
    assert limiter.purge_idle() >= 1
    with pytest.raises(RateLimited):
        limiter.spend(RULE, busy)                  # the busy bucket is still there
