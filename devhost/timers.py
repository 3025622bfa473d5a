"""Timer triggers: NCRONTAB (six fields, seconds first) or TimeSpan schedules, in UTC.

As in Azure: ``runOnStartup`` fires once when the host starts; a run never
overlaps the previous one (the next occurrence is computed after it
ends); a run that starts more than a second late is ``past_due``; a
failing run is logged and the schedule goes on. Unlike Azure there is no
cross-process singleton lock: run one devhost with timers per Azurite
(``python -m devhost --functions`` selects what a process runs).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from azure.functions.timer import TimerRequest
from croniter import croniter

from devhost.config import ConfigError, parse_timespan
from devhost.index import FunctionSpec
from devhost.invoke import Invoker

log = logging.getLogger("devhost.timers")

PAST_DUE_AFTER = timedelta(seconds=1)


class Schedule:
    """A parsed timer schedule."""

    def __init__(self, expression: str) -> None:
        self.expression = expression.strip()
        self._interval: timedelta | None = None
        if ":" in self.expression and len(self.expression.split()) == 1:
            self._interval = timedelta(seconds=parse_timespan(self.expression))
            if self._interval <= timedelta(0):
                raise ConfigError(f"timer schedule {expression!r} must be a positive interval")
            return
        fields = self.expression.split()
        if len(fields) != 6:
            raise ConfigError(f"timer schedule {expression!r} must be an NCRONTAB expression with six fields "
                              "(second minute hour day month day-of-week)")
        if not croniter.is_valid(self.expression, second_at_beginning=True):
            raise ConfigError(f"timer schedule {expression!r} is not a valid NCRONTAB expression")

    def next_after(self, moment: datetime) -> datetime:
        if self._interval is not None:
            return moment + self._interval
        return croniter(self.expression, moment, second_at_beginning=True).get_next(datetime)  # type: ignore[no-any-return]


class TimerRunner:
    """Runs one timer-triggered function on its schedule until stopped."""

    def __init__(self, spec: FunctionSpec, invoker: Invoker, outputs: object) -> None:
        self.spec = spec
        self.schedule = Schedule(str(spec.trigger.get("schedule") or ""))
        self.run_on_startup = bool(spec.trigger.get("runOnStartup"))
        self._invoker = invoker
        self._outputs = outputs
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None
        self._last: datetime | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"timer:{self.spec.name}")

    async def _run(self) -> None:
        try:
            await self._schedule()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("timer %s stopped by a host error", self.spec.name)

    async def _schedule(self) -> None:
        if self.run_on_startup:
            await self._fire(datetime.now(UTC), datetime.now(UTC))
        while not self._stopping.is_set():
            due = self.schedule.next_after(datetime.now(UTC))
            wait_s = (due - datetime.now(UTC)).total_seconds()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=max(0.0, wait_s))
                return
            except TimeoutError:
                pass
            await self._fire(due, datetime.now(UTC))

    async def _fire(self, due: datetime, now: datetime) -> None:
        status = {"Last": (self._last or now).isoformat(), "Next": self.schedule.next_after(now).isoformat(),
                  "LastUpdated": now.isoformat()}
        request = TimerRequest(past_due=now - due > PAST_DUE_AFTER, schedule_status=status,
                                    schedule={"AdjustForDST": True})
        self._last = now
        self._current = asyncio.create_task(self._invoke(request))
        await asyncio.shield(self._current)

    async def _invoke(self, request: TimerRequest) -> None:
        try:
            invocation = await self._invoker.invoke(self.spec, {self.spec.trigger.name: request})
            await self._outputs.write(self.spec, invocation, {})  # type: ignore[attr-defined]
        except Exception:
            log.exception("timer function %s failed", self.spec.name, extra={"function": self.spec.name})

    async def stop(self, grace_s: float) -> None:
        """Stop scheduling; give a running invocation ``grace_s`` to finish."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._current is not None and not self._current.done():
            await asyncio.wait([self._current], timeout=grace_s)
