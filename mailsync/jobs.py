"""Sync jobs as they travel on the queue: a small, versioned JSON document.

A job names *what* to look at (an account, maybe one folder), never the
work itself: the state lives in the cursor table, so a duplicated,
replayed or reordered job is harmless.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from mailsync.errors import PoisonJob
from mailsync.models import Job

if TYPE_CHECKING:
    from mailsync.ports import JobQueue

JOB_SCHEMA_VERSION = 1
MAX_JOB_BYTES = 16_000


class JobKind(enum.StrEnum):
    SYNC_FOLDERS = "sync_folders"      # walk the folder list; start new folders
    SYNC_FOLDER = "sync_folder"        # page one folder's message changes
    RESYNC_FOLDER = "resync_folder"    # restart one folder from scratch (new epoch)
    RESYNC_ACCOUNT = "resync_account"  # every folder (store generation changed, `missed`)
    # Change monitoring (mailsync.monitoring.handler runs these):
    NOTIFIED = "notified"              # Graph notified changes: resolve their folders, enqueue sync_folder
    SYNC_ACCOUNT = "sync_account"      # incremental sync of the folder list and every known folder (polling)
    SUBSCRIPTION = "subscription"      # ensure / renew / recreate the account's Graph subscription
    # The client half (mailsync.actions.service runs it):
    ACTION = "action"                  # carry out user actions on messages at the provider (attrs["actions"])
    # Nothing to do: written by an HTTP function through its queue output binding so that the host's own
    # listener polls at once, for a job it sent with the SDK a moment before (WakingJobQueue).
    WAKE = "wake"


# A SYNC_FOLDERS job with this attribute set to "1" also syncs every known folder: it marks their
# rows dirty (one table batch) and its invocation works them after the folder list (SYNC_ACCOUNT).
EVERY_FOLDER = "every_folder"
# A SYNC_FOLDER a NOTIFIED job runs in its own invocation may carry, under this attribute, what its
# round must read in delta to have seen every notification naming the folder (``Expected``). Only
# such in-process jobs carry it (it can exceed a queue message); a queued job has none.
EXPECT = "expect"
# A SYNC_FOLDER a NOTIFIED job runs in its own invocation as its first round may carry, under this
# attribute, the ETag of the account's pending row, which the job has read but not taken (deleted)
# yet: the round takes it with its slot and lease, in one transaction, before it reads the mailbox
# (``mailsync.monitoring.handler``: taking the row), or on its own first when it cannot.
TAKE_PENDING = "take_pending"
# A SYNC_FOLDER a NOTIFIED job runs in its own invocation with an ``EXPECT`` may carry, under this
# attribute, when the newest of its notifications reached the webhook (POSIX seconds): the round
# reports how long after it its delta read began, and whether it read what it expected
# (``mailsync.monitoring.delta_lag``).
NOTIFIED_AT = "notified_at"
# A SUBSCRIPTION job ("ensure") with this attribute set to "1" starts the account's initial sync once the
# subscriptions exist (a new Outlook account's first job, ``mailsync.monitoring.handler``): every first
# round then reads the mailbox after Graph began notifying its changes, so the initial sync is the sweep
# a new subscription needs, not a second pass over the mailbox after it.
THEN_SYNC = "then_sync"


@dataclass(frozen=True)
class Expected:
    """What a notified folder round must read to have seen its notifications' changes.

    ``versions``: message id → the version tag (Outlook's ``@odata.etag``)
    the round must read as an upsert of the folder; ``removed``: ids it must
    read leaving the folder. See ``mailsync.sync.engine`` (look-agains).
    """

    versions: Mapping[str, str] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()

    def met_by(self, seen: Mapping[str, str | None]) -> bool:
        """``seen``: message id → the version tag a round read (``""`` without one), None when it left."""
        return all(tag and seen.get(mid) == tag for mid, tag in self.versions.items()) and \
            all(mid in seen and seen[mid] is None for mid in self.removed)

    def encode(self) -> str:
        return orjson.dumps({"v": dict(self.versions), "r": sorted(self.removed)}).decode()

    @classmethod
    def decode(cls, text: str | None) -> Expected | None:
        """None when absent or unreadable (the round then looks again as if nothing were expected)."""
        if not text:
            return None
        try:
            body = orjson.loads(text)
            versions = {str(k): str(v) for k, v in body["v"].items()}
            return cls(versions, frozenset(str(mid) for mid in body["r"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None

# Reasons of the sweeps that stand in for notifications that never came: a subscription was just
# created (Graph notifies only the changes made after it exists), Graph says it ``missed`` some, or a
# NOTIFIED job's notifications were taken by a run that died. The engine looks again after such a
# sweep, because delta lags behind the changes it is meant to bring in (mailsync.sync.engine).
SUBSCRIBED = "subscribed"
MISSED = "missed"
NOTIFIED_REDELIVERED = "notified_redelivered"
STAND_IN_SWEEPS = frozenset({SUBSCRIBED, MISSED, NOTIFIED_REDELIVERED})


def new_job(kind: JobKind, account_id: str, folder_id: str | None = None, *, reason: str = "",
            attrs: dict[str, str] | None = None) -> Job:
    """A job with a fresh id (the id follows it through logs and continuations)."""
    return Job(kind=kind.value, account_id=account_id, folder_id=folder_id,
               job_id=uuid.uuid4().hex, reason=reason, attrs=dict(attrs or {}))


def encode_job(job: Job) -> str:
    body: dict[str, Any] = {"v": JOB_SCHEMA_VERSION, "kind": job.kind, "account_id": job.account_id,
                            "job_id": job.job_id}
    if job.folder_id is not None:
        body["folder_id"] = job.folder_id
    if job.reason:
        body["reason"] = job.reason
    if job.attrs:
        body["attrs"] = job.attrs
    return orjson.dumps(body).decode()


class JobOutbox:
    """A ``JobQueue`` keeping the jobs one invocation enqueues, for its queue output binding to send.

    The host writes them after the function returned (before the HTTP response; a failed write fails the
    invocation), so a function cannot undo its own work when the write fails. An output binding cannot
    delay a message either. See ``WakingJobQueue`` for what this is used for.
    """

    def __init__(self) -> None:
        self._bodies: list[str] = []

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        if delay_s:
            raise ValueError("an output binding cannot delay a message: send a delayed job with the queue")
        self._bodies.append(encode_job(job))

    def bodies(self) -> list[str]:
        """The queue output binding's value: one message body per job, in the order enqueued."""
        return list(self._bodies)

    def __bool__(self) -> bool:
        return bool(self._bodies)


class WakingJobQueue:
    """Sends each job with ``queue``, and for one to run now puts a ``WAKE`` job in ``outbox`` (the HTTP
    function's queue output binding on the same queue).

    Why: the Functions host wakes its own listener on a queue the moment one of its functions writes a
    message to that queue through an output binding (the Storage queues extension's
    ``QueueAsyncCollector.AddAsync`` calls ``SharedQueueWatcher.Notify``, which cuts the listener's
    back-off short), while a message sent with the SDK waits for the listener's next poll: up to
    ``maxPollingInterval`` (host.json, 2.5 s) after a quiet spell. The job itself still goes with the SDK,
    inside the function: a failed send is the caller's to handle (an action gives its ledger claim and
    its optimistic rows back), which a failed output write, after the function returned, would not let
    it do. The wake costs one more queue message and no work; a failed wake write fails the request of
    an action that will still run (a retry of it is a no-op).
    """

    def __init__(self, queue: JobQueue, outbox: JobOutbox) -> None:
        self._queue = queue
        self._outbox = outbox

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        self._queue.enqueue(job, delay_s=delay_s)
        if not delay_s and not self._outbox:
            self._outbox.enqueue(new_job(JobKind.WAKE, job.account_id, reason=f"wake for {job.job_id}"))


def decode_job(text: str | bytes) -> Job:
    """Parse a queue message; anything malformed raises PoisonJob (never retried)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_JOB_BYTES:
        raise PoisonJob(f"job message is {len(raw)} bytes, over {MAX_JOB_BYTES}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonJob(f"job message is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise PoisonJob("job message is not a JSON object")
    if body.get("v") != JOB_SCHEMA_VERSION:
        raise PoisonJob(f"unknown job schema version {body.get('v')!r}")
    kind = body.get("kind")
    if kind not in {k.value for k in JobKind}:
        raise PoisonJob(f"unknown job kind {kind!r}")
    account_id = body.get("account_id")
    if not isinstance(account_id, str) or not account_id:
        raise PoisonJob("job has no account_id")
    folder_id = body.get("folder_id")
    if folder_id is not None and not isinstance(folder_id, str):
        raise PoisonJob("job folder_id must be a string")
    if kind in (JobKind.SYNC_FOLDER.value, JobKind.RESYNC_FOLDER.value) and not folder_id:
        raise PoisonJob(f"{kind} job needs a folder_id")
    attrs = body.get("attrs") or {}
    if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()):
        raise PoisonJob("job attrs must map strings to strings")
    return Job(kind=kind, account_id=account_id, folder_id=folder_id,
               job_id=str(body.get("job_id") or uuid.uuid4().hex),
               reason=str(body.get("reason") or ""), attrs=attrs)
