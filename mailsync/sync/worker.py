"""The sync worker's use case: one queue message in, the right handler run.

``functions/sync_worker`` decodes the message and calls :meth:`SyncWorker.run`;
this module owns the dispatch table. The engine handles the sync kinds;
other parts of the product register their own (change monitoring's
NOTIFIED / SYNC_ACCOUNT / SUBSCRIPTION) with one ``register`` call in the
composition root.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mailsync.errors import PoisonJob
from mailsync.jobs import JobKind, JobOutbox
from mailsync.models import Job
from mailsync.ports import EventPublisher
from mailsync.sync.engine import Delivery, Outcome, SyncEngine

log = logging.getLogger("mailsync.sync.worker")


@dataclass(frozen=True)
class Invocation:
    """What a handler gets besides the job: the queue delivery, the invocation's event buffer and, when the
    function has one, its queue output binding on the sync queue (``outbox``: the engine's jobs to run now
    put a WAKE there, ``mailsync.jobs.WakingJobQueue``)."""

    delivery: Delivery
    events: EventPublisher
    outbox: JobOutbox | None = None


JobHandler = Callable[[Job, Invocation], object]

ENGINE_KINDS = (JobKind.SYNC_FOLDERS, JobKind.SYNC_FOLDER, JobKind.RESYNC_FOLDER, JobKind.RESYNC_ACCOUNT)


class SyncWorker:
    """Dispatches jobs by kind. Unknown kinds are poison (retrying cannot help)."""

    def __init__(self, engine: SyncEngine) -> None:
        self._handlers: dict[str, JobHandler] = {}
        self.register(ENGINE_KINDS, lambda job, inv: engine.handle(job, inv.delivery, inv.events, wake=inv.outbox))

    def register(self, kinds: Iterable[str], handler: JobHandler) -> None:
        """Route ``kinds`` to ``handler`` (a later registration of a kind replaces the earlier one)."""
        for kind in kinds:
            self._handlers[str(kind)] = handler

    def handles(self, kind: str) -> bool:
        return kind in self._handlers

    def run(self, job: Job, invocation: Invocation) -> object:
        handler = self._handlers.get(job.kind)
        if handler is None:
            raise PoisonJob(f"no handler for job kind {job.kind!r}")
        result = handler(job, invocation)
        return result if result is not None else Outcome.DONE
