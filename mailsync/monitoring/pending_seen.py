"""Pending rows this process saw with a live job: the webhook adds to them without reading them first.

Why: a request for an account whose pending row is still there (its NOTIFIED
job not yet run: ~40 % of the requests at 30 accounts and 8 changes/s on a
busy host) cost three table calls: the refused insert, a read, and an ETag
replace. Most of that read's purpose is the rule that keeps a lost job from
swallowing notifications: a row whose job was enqueued more than
``PENDING_STALE_S`` ago gets a fresh job. A process that created the row, or
read it, knows when its job was enqueued; any row there now was either that
one or created after it was taken (a later ``enqueued_at``), so while that
time is recent the row's job is presumed live and the request may write its
notifications as a part of the row (``PendingStore.add``): two calls.
Past ``FRESH_S`` the webhook reads the row again, as before.

Replays stay free when they can be told apart: a notification naming the
same message *and version* as one this process put in a row is about a
change that row's job reads (or has read: a job takes its row before it
reads the mailbox), so it is dropped with no write. One without a version
(a deletion, or a change Outlook sent no tag for) cannot be told from a
second change to the same message once the row is taken, so it is written.

Per process, bounded (``MAX_ENTRIES`` accounts, oldest dropped first;
``MAX_PARTS`` parts per row, past which the row is read and replaced, which
folds the parts away), thread-safe. Nothing here is needed for correctness
that the table does not also enforce: a forgotten account is read as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mailsync.monitoring.records import Notified

MAX_ENTRIES = 10_000
MAX_PARTS = 200             # an entity holds 252 properties; the row's own take 9
MAX_REMEMBERED = 500        # versioned notifications remembered per row, for telling replays


@dataclass
class _Seen:
    enqueued_at: datetime
    parts: int = 0
    versioned: set[tuple[str, str, str]] = field(default_factory=set)
    due_at: datetime | None = None      # when the row's earliest job becomes visible, if this process knows


class SeenPendingRows:
    """When each account's pending row had its job enqueued, as this process last saw it."""

    def __init__(self, *, fresh_s: float, max_entries: int = MAX_ENTRIES) -> None:
        """``fresh_s``: how long after its job's enqueue a row's job is presumed live (keep it well
        below the stale rule's threshold: the row's time comes from another process's clock)."""
        self._fresh = timedelta(seconds=fresh_s)
        self._max = max_entries
        self._lock = threading.Lock()
        self._rows: OrderedDict[str, _Seen] = OrderedDict()

    def saw(self, account_id: str, enqueued_at: datetime,
            notified: Iterable[Notified] = (), *, due_at: datetime | None = None) -> None:
        """The row as this process created or read and replaced it (holding ``notified`` now); ``due_at``:
        when the job this process just enqueued for it becomes visible (else what was known of the same row)."""
        with self._lock:
            known = self._rows.get(account_id)
            if due_at is None and known is not None and known.enqueued_at == enqueued_at:
                due_at = known.due_at
            self._rows[account_id] = _Seen(enqueued_at, 0, _versioned(notified), due_at)
            self._rows.move_to_end(account_id)
            while len(self._rows) > self._max:
                self._rows.popitem(last=False)

    def may_add(self, account_id: str, now: datetime) -> bool:
        """Whether a request may add a part to the account's row without reading it."""
        with self._lock:
            seen = self._rows.get(account_id)
            return seen is not None and now - seen.enqueued_at < self._fresh and seen.parts < MAX_PARTS

    def is_replay(self, account_id: str, now: datetime, notified: Iterable[Notified],
                  folder_notices: int) -> bool:
        """Whether every notification is one this process put in a row whose job is presumed live."""
        items = list(notified)
        if folder_notices or not items:
            return False
        with self._lock:
            seen = self._rows.get(account_id)
            if seen is None or now - seen.enqueued_at >= self._fresh:
                return False
            # One version is one state of the message, so one folder too: the tag alone tells a replay.
            return all(tag is not None and (change_type, message_id, tag) in seen.versioned
                       for change_type, message_id, tag, _folder in items)

    def added(self, account_id: str, notified: Iterable[Notified]) -> None:
        with self._lock:
            seen = self._rows.get(account_id)
            if seen is None:
                return
            seen.parts += 1
            if len(seen.versioned) < MAX_REMEMBERED:
                seen.versioned |= _versioned(notified)

    def due_by(self, account_id: str, when: datetime) -> bool:
        """Whether a job of the account's row is known to become visible by ``when``."""
        with self._lock:
            seen = self._rows.get(account_id)
            return seen is not None and seen.due_at is not None and seen.due_at <= when

    def hastened(self, account_id: str, due_at: datetime) -> None:
        """Another job of the row was enqueued, visible at ``due_at``."""
        with self._lock:
            seen = self._rows.get(account_id)
            if seen is not None and (seen.due_at is None or due_at < seen.due_at):
                seen.due_at = due_at

    def forget(self, account_id: str) -> None:
        with self._lock:
            self._rows.pop(account_id, None)


def _versioned(notified: Iterable[Notified]) -> set[tuple[str, str, str]]:
    return {(change_type, message_id, tag) for change_type, message_id, tag, _folder in notified if tag is not None}
