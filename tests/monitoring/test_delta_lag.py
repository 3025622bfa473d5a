"""The delay learnt from notified rounds (mailsync/monitoring/delta_lag.py), and the webhook applying it."""

from __future__ import annotations

import time

from mailsync.monitoring.delta_lag import FORGET_S, MAX_DELAY_S, DeltaLag
from mailsync.monitoring.notifications import NotificationReceiver
from tests.monitoring.harness import Harness, change, make_harness


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_no_delay_until_a_round_misses_then_the_latest_miss_plus_a_margin() -> None:
    clock = Clock()
    lag = DeltaLag(clock=clock, window=4)
    for age in (0.1, 0.3, 2.5):
        lag.observe(age, True)
    assert lag.delay_s() == 0.0, "rounds that read what they were told: no delay"
    lag.observe(0.2, False)
    assert lag.delay_s() == 1.0, "whole seconds, as the queue delays, at least one"
    lag.observe(1.7, False)
    assert lag.delay_s() == 2.0
    lag.observe(30.0, False)
    assert lag.delay_s() == MAX_DELAY_S, "bounded"


def test_misses_leave_the_window_and_age_out() -> None:
    clock = Clock()
    lag = DeltaLag(clock=clock, window=3)
    lag.observe(0.5, False)
    for _ in range(3):
        lag.observe(1.0, True)
    assert lag.delay_s() == 0.0, "held past the lag, rounds read their versions: the delay falls again"
    lag.observe(0.5, False)
    clock.now += FORGET_S
    assert lag.delay_s() == 0.0


def test_the_webhook_holds_the_notified_job_for_the_learnt_delay(storage_env: dict[str, str]) -> None:
    harness: Harness = make_harness(storage_env, NOTIFY_COALESCE_S="0")
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    lag = DeltaLag()
    receiver = NotificationReceiver(harness.settings, harness.subscriptions, harness.accounts, harness.pending,
                                    harness.queue, lag=lag)
    receiver.receive({"value": [change(sub, state, "m1")]})
    assert harness.queued_count() == 1, "nothing learnt: at once"
    harness.drain()
    harness.pending.delete(harness.pending.get(account))  # type: ignore[arg-type]
    lag.observe(1.0, False)                                 # a round 1 s after its notification was too early
    receiver.receive({"value": [change(sub, state, "m2")]})
    assert harness.queued_count() == 1 and harness.drain() == [], "enqueued, invisible: held past the lag"
    time.sleep(1.5)
    assert [job.account_id for job in harness.drain()] == [account]
