"""Timer: hourly clean-up of what anonymous callers leave behind (docs/security.md).

Deletes expired pending sign-ins and accounts that were never linked and
sat idle for ``STALE_LINKING_S`` (default an hour), moves identity claims
older versions wrote (docs/linking.md, Tables), and drops rate-limit
buckets that have refilled. Each step is idempotent; a failed run is
simply redone by the next one.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import azure.functions as func

from functions._shared.runtime import runtime
from mailsync.logs import log_context

log = logging.getLogger("mailsync.functions.maintenance")

bp = func.Blueprint()


@bp.function_name("maintenance")
@bp.timer_trigger(arg_name="timer", schedule="0 17 * * * *", run_on_startup=False, use_monitor=True)
def maintenance(timer: func.TimerRequest) -> None:
    rt = runtime()
    with log_context(function="maintenance"):
        report = rt.linking.clean_up(timedelta(seconds=rt.settings.stale_linking_s))
        buckets = rt.rate_limiter.purge_idle()
        log.info("maintenance: %d expired sign-ins, %d never-linked accounts, %d claims migrated, "
                 "%d idle rate-limit buckets removed", report.expired_sign_ins, report.stale_accounts,
                 report.migrated_claims, buckets)
