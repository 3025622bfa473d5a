"""A folder round's store writes in flight: the next pages are written while the last ones are acknowledged.

``mailsync.sync.pipeline`` overlaps *reading* page N+1 with writing page N.
That still left the store with one bulk request of the folder at a time, and
the engine thread idle while it was indexed: a node indexes a bulk request on
one write thread per shard, so a folder as large as an Inbox kept one of the
node's cores busy and the syncing host waited for it (measured: ~1.4 of two
cores busy while only the Inbox was left, bench/README.md). Here up to
``depth`` writes of one folder are in flight at once, each on a thread of its
own, while the engine thread takes the next pages and saves cursors.

The rule that keeps a crash harmless is unchanged: **a cursor is saved only
after the writes of its page and of every page before it are acknowledged.**
Writes are handed back strictly in the order they were started
(:meth:`PageWrites.pop`), and the engine saves the cursor of the newest one
it popped; a write that failed stops the popping, so nothing after it is
saved before it has been written again.

Two writes in flight must not touch the same message: their order at the
store is not the order they were started in, and a removal overtaken by an
older upsert (or the reverse) would leave the wrong last word. Versions
settle two upserts, nothing settles an upsert against a removal, so a page
that names a message already in flight waits for the writes before it
(:meth:`PageWrites.overlaps`). An initial round's pages never overlap
(IMAP's are disjoint UID ranges; a Graph delta repeats an id only when it
changed while being paged).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

from mailsync.models import MessageBatch

_W = TypeVar("_W")


def page_ids(pages: Sequence[MessageBatch]) -> frozenset[str]:
    """Every message id the pages upsert or remove."""
    ids: set[str] = set()
    for page in pages:
        ids.update(map(_message_id, page.upserts))   # attrgetter: ~2x a generator over 1,000 records
        ids.update(page.removals)
    return frozenset(ids)


_message_id = operator.attrgetter("message_id")


@dataclass(frozen=True)
class _Write(Generic[_W]):
    pages: list[MessageBatch]
    ids: frozenset[str]
    future: Future[_W]


class PageWrites(Generic[_W]):
    """Up to ``depth`` writes of page groups in flight, handed back in the order they were started.

    ``write(pages)`` runs on a writer thread and returns what the engine
    needs to record the pages (its result) or raises. The engine thread
    calls :meth:`start`, :meth:`pop` and finally :meth:`close`; the class is
    not meant to be shared between engine threads.
    """

    def __init__(self, write: Callable[[list[MessageBatch]], _W], *, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._write = write
        self.depth = depth
        self._flight: deque[_Write[_W]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self.last_failed: list[MessageBatch] = []

    def __len__(self) -> int:
        return len(self._flight)

    @property
    def full(self) -> bool:
        """``depth`` writes are in flight: the next start must wait for the oldest."""
        return len(self._flight) >= self.depth

    def overlaps(self, pages: Sequence[MessageBatch], ids: frozenset[str] | None = None) -> bool:
        """Whether a write in flight names a message these pages name too (``ids``: their ``page_ids``, if known)."""
        if not self._flight:
            return False
        ids = page_ids(pages) if ids is None else ids
        return any(not ids.isdisjoint(w.ids) for w in self._flight)

    def start(self, pages: list[MessageBatch], ids: frozenset[str] | None = None) -> None:
        """Start writing ``pages`` on a writer thread (the caller made room: not ``full``, no overlap).

        ``ids``: the pages' ``page_ids`` when the caller has them already (from :meth:`overlaps`).
        """
        if self.full:
            raise RuntimeError("no room for another write in flight")
        if self._pool is None:
            # Made on the first write: most incremental rounds have one page and start one write.
            self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="mailsync-page-write")
        self._flight.append(_Write(pages, page_ids(pages) if ids is None else ids,
                                   self._pool.submit(self._write, pages)))

    def oldest_done(self) -> bool:
        """Whether the oldest write in flight has its answer (``pop`` will not wait)."""
        return bool(self._flight) and self._flight[0].future.done()

    def pop(self) -> tuple[list[MessageBatch], _W]:
        """The oldest write's pages and result, waiting for it; its error is raised instead.

        After an error the writes behind it are still in flight: the caller
        takes them with :meth:`abandon` (never saving a cursor of theirs
        before the failed pages are written again).
        """
        oldest = self._flight.popleft()
        try:
            return oldest.pages, oldest.future.result()
        except BaseException:
            self.last_failed = oldest.pages
            raise

    def abandon(self) -> list[MessageBatch]:
        """Wait for every write in flight and drop its outcome; their pages, oldest first.

        For a failure or a round that ends without them: no write may still
        be running when the caller writes these pages again, gives the lease
        back or starts another round (it would race the next holder's).
        """
        flight, self._flight = list(self._flight), deque()
        if flight:
            wait([w.future for w in flight])
        return [page for w in flight for page in w.pages]

    def close(self) -> None:
        """Abandon what is in flight and stop the writer threads."""
        self.abandon()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
