"""The polling spread: every account once per interval, evenly, never all at once."""

from __future__ import annotations

from collections import Counter

import pytest

from mailsync.monitoring.polling import due_delay, offset_s
from mailsync.monitoring.subscriptions import retry_backoff_s, webhooks_enabled
from mailsync.settings import Settings


@pytest.mark.parametrize("jitter", [[0.0], [17.5], [-12.0, 25.0, 0.3, -0.2, 29.0]])
def test_each_account_is_due_exactly_once_per_interval_and_the_load_is_even(jitter: list[float]) -> None:
    interval, tick = 900, 60
    accounts = [f"acct{i:05d}" for i in range(10_000)]
    boundary = 1_800_000_000.0 - 1_800_000_000.0 % tick
    due_per_account: Counter[str] = Counter()
    per_second: Counter[int] = Counter()
    for step in range(interval // tick):
        now = boundary + step * tick + jitter[step % len(jitter)]   # timers fire a little late or early
        for account in accounts:
            delay = due_delay(account, interval, tick, now)
            if delay is not None:
                assert 0.0 < delay < 2.5 * tick
                due_per_account[account] += 1
                per_second[int(now + delay)] += 1
    assert set(due_per_account.values()) == {1}
    assert len(due_per_account) == len(accounts)
    # 10,000 accounts over 900 s is ~11 a second; the busiest second stays in that range.
    assert max(per_second.values()) < 40


def test_offsets_are_stable_and_inside_the_interval() -> None:
    assert offset_s("abc", 900) == offset_s("abc", 900)
    assert all(0 <= offset_s(f"a{i}", 900) < 900 for i in range(1000))


def test_an_interval_shorter_than_the_tick_still_polls_every_tick() -> None:
    hits = sum(due_delay(f"a{i}", 10, 60, 1_800_000_000.0) is not None for i in range(100))
    assert hits == 100


def test_webhooks_need_a_public_https_url_unless_the_sandbox_stands_in() -> None:
    real = {"MS_CLIENT_ID": "id", "MS_CLIENT_SECRET": "secret"}
    assert webhooks_enabled(Settings.from_env({}))  # sandbox mode
    assert not webhooks_enabled(Settings.from_env(real))  # PUBLIC_BASE_URL unset → 127.0.0.1
    for url in ("http://mail.example.com", "https://localhost:7071", "https://10.0.0.4", "https://192.168.1.2"):
        assert not webhooks_enabled(Settings.from_env({**real, "PUBLIC_BASE_URL": url})), url
    assert webhooks_enabled(Settings.from_env({**real, "PUBLIC_BASE_URL": "https://mailsync.example.com"}))


def test_retry_backoff_grows_and_is_capped() -> None:
    delays = [retry_backoff_s(n) for n in range(1, 20)]
    assert delays == sorted(delays) and delays[0] == 60 and max(delays) == 3600
