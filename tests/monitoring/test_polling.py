"""The poll scheduler against Azurite: who is polled, how often, and with what delay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailsync.jobs import JobKind
from mailsync.models import AccountStatus
from mailsync.monitoring.polling import PollScheduler
from mailsync.monitoring.records import AccountMonitor
from tests.monitoring.harness import Harness, make_harness

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def accounts(h: Harness) -> dict[str, str]:
    """One account in each monitoring situation: name -> account id."""
    made = {name: h.add_account() for name in ("healthy", "failing", "expired", "never")}
    made["reauth"] = h.add_account(AccountStatus.REAUTH_REQUIRED)
    made["linking"] = h.add_account(AccountStatus.LINKING)
    later = NOW + timedelta(days=1)
    h.subscriptions.save_monitor(AccountMonitor(made["healthy"], "s1", later))
    h.subscriptions.save_monitor(AccountMonitor(made["failing"], "s2", later, failures=2, last_error="provider_error"))
    h.subscriptions.save_monitor(AccountMonitor(made["expired"], "s3", NOW - timedelta(minutes=1)))
    return made


def polled(env: dict[str, str], **settings: str) -> dict[str, str]:
    """Run one tick; return account id -> reason of every job it enqueued (waiting out their delays)."""
    harness = make_harness(env, **settings)
    scheduler = PollScheduler(harness.settings, harness.accounts, harness.subscriptions, harness.queue,
                              clock=lambda: NOW)
    report = scheduler.tick()
    count = harness.queued_count()
    assert count == report.polled + report.swept
    jobs = harness.drain()
    while len(jobs) < count:                 # delayed by up to 2.5 ticks (5 s here)
        jobs += harness.drain(wait_s=0.5)
    assert {job.kind for job in jobs} <= {JobKind.SYNC_ACCOUNT.value}
    return {job.account_id: job.reason for job in jobs}


def test_accounts_without_a_healthy_subscription_are_polled_and_the_rest_swept(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env)
    made = accounts(h)
    # Interval == tick: every due account is enqueued on every tick (short delays keep the test quick).
    got = polled(storage_env, POLL_INTERVAL_S="2", POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="2")
    by_name = {name: got.get(account) for name, account in made.items()}
    assert by_name == {"healthy": "sweep", "failing": "poll", "expired": "poll", "never": "poll",
                       "reauth": None, "linking": None}


def test_safety_sweeps_can_be_turned_off(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env)
    made = accounts(h)
    got = polled(storage_env, POLL_INTERVAL_S="2", POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="0")
    assert made["healthy"] not in got and made["never"] in got


def test_without_a_reachable_webhook_every_account_is_polled(storage_env: dict[str, str]) -> None:
    h = make_harness(storage_env)
    made = accounts(h)
    # Real Microsoft Graph, PUBLIC_BASE_URL unset (127.0.0.1): Graph could never call us.
    got = polled(storage_env, MS_CLIENT_ID="app", MS_CLIENT_SECRET="secret", POLL_INTERVAL_S="2",
                 POLL_TICK_S="2", POLL_INTERVAL_SUBSCRIBED_S="0")
    assert {a for name, a in made.items() if name not in ("reauth", "linking")} == set(got)
    assert set(got.values()) == {"poll"}
