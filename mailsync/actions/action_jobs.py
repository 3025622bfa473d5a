"""ACTION jobs: the accepted actions on the queue, inline or (too many for one message) kept in the ledger."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mailsync.actions.job_payload import Planned, encode_actions
from mailsync.jobs import MAX_JOB_BYTES, JobKind, new_job
from mailsync.models import Job
from mailsync.ports import ActionLedger, JobQueue

# The actions travel as a JSON string inside the job's JSON: every quote is escaped, so half the size.
_JOB_BUDGET = (MAX_JOB_BYTES - 1500) // 2


class ActionJobs:
    """Builds ACTION jobs and puts them on the queue."""

    def __init__(self, queue: Callable[[], JobQueue], ledger: Callable[[], ActionLedger]) -> None:
        self._queue = queue
        self._ledger = ledger

    def enqueue(self, account_id: str, planned: Sequence[Planned], *, attempt: int, reason: str,
                 delay_s: float = 0.0, restore: bool = False) -> None:
        self._queue().enqueue(self.job(account_id, planned, attempt=attempt, reason=reason,
                                  restore=restore), delay_s=delay_s)

    def job(self, account_id: str, planned: Sequence[Planned], *, attempt: int, reason: str,
                    restore: bool = False) -> Job:
        """One ACTION job: the actions in it when they fit a queue message, else kept in the ledger and named.

        Not a job per 16 kB of actions: ~27 Graph ids fit one, so 500 made ~19 jobs that the worker ran at
        once, whose batches then fought over the mailbox's 4 request slots (429s, Retry-After) — 40 s for
        what one job does in ~13 (bench/actions.py).
        """
        text = encode_actions(planned)
        attrs = {"attempt": str(attempt)}
        if restore:
            attrs["restore"] = "1"     # put the rows back only: the actions failed already (ActionWorker._restore)
        if len(text) <= _JOB_BUDGET:
            attrs["actions"] = text
        else:
            attrs["batch"] = self._ledger().put_batch(account_id, text)
        return new_job(JobKind.ACTION, account_id, reason=reason, attrs=attrs)
