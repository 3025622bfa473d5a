"""sync_worker: the queue trigger on SYNC_QUEUE_NAME that runs sync jobs.

Thin: decode the message, run the job (``mailsync.sync.worker``), set the
live events as the SignalR output, map failures to the host's retries.

Failures:
* A message that cannot be decoded (or names a kind nobody handles) goes
  straight to ``<queue>-poison`` through the ``poison`` output, with the
  reason beside the original text, and the trigger succeeds: retrying a
  message that can never parse would only delay the same answer by
  ``maxDequeueCount`` visibility timeouts and lose the reason.
* Anything else that escapes the engine (tables or queue down, a bug) is
  raised: the host makes the message visible again and, after
  ``maxDequeueCount`` attempts, moves it to the poison queue itself. The
  engine has already given its lease and slot back (or a redelivery of the
  same message takes them over), so a retry is always safe.
  Expected faults (throttling, provider or store outages) never get here:
  the engine re-enqueues the job with a visibility delay instead.

Jobs the run enqueues to run now (a new account's fan-out to its folders, a
round's continuation) go with the SDK inside the run, and a WAKE follows
through the ``wake`` output binding on the same queue
(``mailsync.jobs.WakingJobQueue``): the host then polls as the invocation
returns instead of after its idle back-off (up to ``maxPollingInterval``).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import azure.functions as func
import orjson

from functions._shared.runtime import runtime
from mailsync.errors import PoisonJob
from mailsync.jobs import JobOutbox, decode_job
from mailsync.logs import log_context
from mailsync.realtime.signalr_messages import BufferingPublisher
from mailsync.sync.engine import Delivery
from mailsync.sync.worker import Invocation

log = logging.getLogger("mailsync.functions.sync_worker")

bp = func.Blueprint()


def poison_record(body: bytes, reason: str, *, message_id: str, dequeue_count: int) -> str:
    """What lands on the poison queue: the reason, and the original text (never parsed further)."""
    return orjson.dumps({"reason": reason, "message_id": message_id, "dequeue_count": dequeue_count,
                         "body": body.decode("utf-8", errors="replace")}).decode()


def queued_s(msg: func.QueueMessage) -> str | None:
    """Seconds the message waited on the queue (insertion to now, any visibility delay included), for the log."""
    inserted = msg.insertion_time
    return None if inserted is None else f"{max(0.0, (datetime.now(UTC) - inserted).total_seconds()):.3f}"


@bp.function_name("sync_worker")
@bp.queue_trigger(arg_name="msg", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
@bp.generic_output_binding(arg_name="signalr", type="signalR", hub_name="%SIGNALR_HUB%",
                           connection_string_setting="AzureSignalRConnectionString")
@bp.queue_output(arg_name="poison", queue_name="%SYNC_QUEUE_NAME%-poison", connection="AzureWebJobsStorage")
@bp.queue_output(arg_name="wake", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
def sync_worker(msg: func.QueueMessage, signalr: func.Out[str], poison: func.Out[str],
                wake: func.Out[list[str]]) -> None:
    body = msg.get_body()
    dequeue_count = int(msg.dequeue_count or 1)
    # Queue age is the signal to scale on (docs/scaling.md): every line of the invocation carries it.
    with log_context(function="sync_worker", queue_message_id=msg.id, queued_s=queued_s(msg)):
        try:
            job = decode_job(body)
        except PoisonJob as exc:
            log.error("poison job message: %s", exc.message)
            poison.set(poison_record(body, exc.message, message_id=msg.id, dequeue_count=dequeue_count))
            return
        worker = runtime().sync_worker
        if not worker.handles(job.kind):
            reason = f"no handler for job kind {job.kind!r}"
            log.error("poison job message: %s", reason)
            poison.set(poison_record(body, reason, message_id=msg.id, dequeue_count=dequeue_count))
            return
        events = BufferingPublisher()
        outbox = JobOutbox()
        started = time.monotonic()
        worker.run(job, Invocation(Delivery(delivery_id=msg.id or job.job_id, dequeue_count=dequeue_count), events,
                                   outbox))
        if events:
            signalr.set(events.messages_json())
        if outbox:
            wake.set(outbox.bodies())
        log.info("job ran", extra={"kind": job.kind, "reason": job.reason,
                                   "run_s": round(time.monotonic() - started, 3)})
