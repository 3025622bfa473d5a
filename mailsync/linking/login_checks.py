"""A small bounded pool for the login checks of ``POST /api/accounts`` (anonymous, user-chosen hosts).

A login check waits on a server the caller chose: a silent one holds a
thread for the whole timeout. Run on the threads that serve HTTP, twenty
such requests starved every other endpoint (a ``GET /api/accounts/{id}``
took 18 s). So checks run here, on a few threads of their own:

* **Admission never waits.** A check gets a slot at once or the request is
  answered 503 with ``Retry-After`` (``LoginChecksBusy``): a queue would
  only turn a flood into latency for everybody.
* **A slot is held until the check really ends**, not until its caller gives
  up: a server that trickles bytes keeps its slot until the socket timeout,
  so the number of sockets held open for anonymous callers stays bounded.
* **The caller waits at most** ``deadline_s``, then answers "timed out"; the
  check thread finishes on its own (every socket operation has a timeout).

The pool is per process (one per Function App worker), created by the
composition root.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from mailsync.errors import DependencyUnavailable, ProviderUnavailable

T = TypeVar("T")


class LoginChecksBusy(DependencyUnavailable):
    """Every login-check slot is taken: 503 with Retry-After."""

    code = "login_checks_busy"


class LoginCheckPool:
    """Runs login checks on ``slots`` threads of its own; refuses (503) when all are busy."""

    def __init__(self, slots: int, *, deadline_s: float, retry_after_s: float = 5.0) -> None:
        if slots < 1 or deadline_s <= 0:
            raise ValueError("a login check pool needs at least one slot and a positive deadline")
        self._slots = threading.BoundedSemaphore(slots)
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="login-check")
        self._deadline_s = deadline_s
        self._retry_after_s = retry_after_s

    def run(self, check: Callable[[], T]) -> T:
        """``check()`` on a pool thread: its result or exception; LoginChecksBusy or ProviderUnavailable."""
        if not self._slots.acquire(blocking=False):
            raise LoginChecksBusy("too many mailbox logins are being checked right now; try again in a moment",
                                  retry_after_s=self._retry_after_s)
        try:
            future = self._pool.submit(self._holding_slot, check)
        except BaseException:
            self._slots.release()
            raise
        try:
            return future.result(timeout=self._deadline_s)
        except FutureTimeout as exc:
            raise ProviderUnavailable(f"the login check took longer than {self._deadline_s:g} s",
                                      retry_after_s=30.0, code="imap_timeout") from exc

    def _holding_slot(self, check: Callable[[], T]) -> T:
        try:
            return check()
        finally:
            self._slots.release()
