"""Timer: the polling fallback (``mailsync.monitoring.polling``).

Fires every minute — keep ``POLL_TICK_S`` (default 60) equal to this
schedule — and enqueues, with a visibility delay, an incremental sync for
the accounts whose slot in the poll interval falls in the coming minute.
"""

from __future__ import annotations

import azure.functions as func

from functions._shared.runtime import runtime
from mailsync.logs import log_context

bp = func.Blueprint()


@bp.function_name("poll_scheduler")
@bp.timer_trigger(arg_name="timer", schedule="0 * * * * *", run_on_startup=False, use_monitor=True)
def poll_scheduler(timer: func.TimerRequest) -> None:
    with log_context(function="poll_scheduler"):
        runtime().poll_scheduler.tick()
        runtime().imap_poller.tick()   # IMAP accounts: STATUS every tick, a job only where something moved
