"""Timer triggers: NCRONTAB parsing and a schedule that fires under the devhost."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from devhost.config import ConfigError
from devhost.timers import Schedule
from tests.devhost.conftest import HostFactory


def test_six_field_ncrontab_seconds_first() -> None:
    start = datetime(2026, 1, 5, 9, 29, 59, tzinfo=UTC)  # a Monday
    assert Schedule("0 */5 * * * *").next_after(start) == datetime(2026, 1, 5, 9, 30, 0, tzinfo=UTC)
    assert Schedule("30 0 9 * * 1-5").next_after(start) == datetime(2026, 1, 6, 9, 0, 30, tzinfo=UTC)
    assert Schedule("*/10 * * * * *").next_after(start) == datetime(2026, 1, 5, 9, 30, 0, tzinfo=UTC)


def test_timespan_schedule() -> None:
    start = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
    assert Schedule("00:15:00").next_after(start) == datetime(2026, 1, 5, 9, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["*/5 * * * *", "* * * * * * *", "61 * * * * *", "nonsense", "00:00:00"])
def test_invalid_schedules_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        Schedule(bad)


def test_timer_fires_on_schedule_and_does_not_overlap(host_sample: HostFactory) -> None:
    host = host_sample(functions=frozenset({"tick"}))
    host.recorder.wait_for(lambda r: len(r.of("tick")) >= 2)
    host.stop()
    ticks = host.recorder.of("tick")
    assert all(t.data["past_due"] is False for t in ticks)
    assert all("Next" in t.data["status"] and "Last" in t.data["status"] for t in ticks)
    assert ticks[1].at > ticks[0].at
