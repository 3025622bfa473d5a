"""Accounts a worker process read moments ago, for the NOTIFIED job's check that its account is live.

Why: every NOTIFIED job read the account row (is it still linked, is it
syncing or synced?) before syncing what its notifications name: one table
transaction per job, ~0.7 per change, a seventh of a change's table calls.
An account's status changes rarely (linked, synced, needs signing in again,
unlinked); a busy account gets a job every few seconds.

What makes a reuse safe:

* **Unlinked**: the caller passes ``linked``, what its own read of the
  account's sync partition shows (the folder-list row). The unlink deletes
  those rows before the account row (``mailsync.linking.service``), so a
  partition read that still shows them was made before the account row
  went: reading the account too would have found it. Without the row the
  account is read.
* **Status**: only a watched status (syncing, synced) is reused, for at most
  ``TTL_S``. An account that needs signing in again is always read, so a
  re-link is seen at once; a synced account whose grant was revoked within
  the last ``TTL_S`` costs its job a refused token (the engine then marks
  it, as it would have), or the job syncs with the access token it still
  holds: Graph takes an access token until it expires (about an hour),
  whatever became of the grant, so a fresher read would not have told
  Graph's answer apart. The engine's end never sets a status from this copy
  (below), so a "needs signing in" set meanwhile stays.
* **Why five minutes, not seconds**: at 1,000 accounts and 20 changes a
  second an account gets a change every ~50 s, and each of three worker
  processes sees it every ~150 s. With 30 s the copy was almost never
  fresh: 0.82 account reads per change, a sixth of a change's table calls,
  in ``bench/change_latency.py --scale-run``.
* **Syncing / synced**: the engine decides "synced" from the rows and a
  fresh read of the account (``InvocationBase._update_account``), never
  from this copy.

Per process, bounded (``MAX_ENTRIES``, oldest dropped first), thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from mailsync.models import Account
from mailsync.monitoring.records import AccountDirectory
from mailsync.monitoring.subscriptions import WATCHED_STATUSES

TTL_S = 300.0
MAX_ENTRIES = 10_000


class RecentAccounts:
    """``get`` an account, reusing this process's read of the last ``ttl_s`` when the caller vouches it is linked."""

    def __init__(self, accounts: AccountDirectory, *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._accounts = accounts
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, tuple[float, Account]] = OrderedDict()

    def get(self, account_id: str, *, linked: bool) -> Account | None:
        """The account, or None when gone. ``linked``: the caller's own read shows its sync rows."""
        now = self._clock()
        if linked:
            with self._lock:
                entry = self._seen.get(account_id)
            if entry is not None and now - entry[0] < self._ttl_s:
                return entry[1]
        account = self._accounts.get(account_id)
        with self._lock:
            if account is not None and account.status in WATCHED_STATUSES:
                self._seen[account_id] = (now, account)
                self._seen.move_to_end(account_id)
                while len(self._seen) > self._max:
                    self._seen.popitem(last=False)
            else:
                self._seen.pop(account_id, None)
        return account
