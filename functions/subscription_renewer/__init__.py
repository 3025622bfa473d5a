"""Timer: renew Graph subscriptions before they expire; create missing ones.

Every 10 minutes (renewal starts ``SUBSCRIPTION_RENEW_BEFORE_S`` before
expiry, default 6 h, so many chances to succeed). The timer only scans and
enqueues SUBSCRIPTION jobs; the sync worker makes the Graph calls.
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions._shared.runtime import runtime
from mailsync.logs import log_context

log = logging.getLogger("mailsync.functions.subscription_renewer")

bp = func.Blueprint()


@bp.function_name("subscription_renewer")
@bp.timer_trigger(arg_name="timer", schedule="0 */10 * * * *", run_on_startup=False, use_monitor=True)
def subscription_renewer(timer: func.TimerRequest) -> None:
    with log_context(function="subscription_renewer"):
        report = runtime().subscription_manager.renewal_pass()
        log.info("renewer: %d to renew, %d to create, %d removed", report.renew, report.create, report.removed)
