"""Read-ahead of one folder's change pages while the previous ones are written.

A folder's pages come one after the other (each cursor comes from the page
before it), so the only overlap available is between *reading* page N+1
from the provider and *writing* page N to the store. One reader thread
fetches ahead, at most ``depth`` pages; the engine takes every page that is
ready at once and writes them as one bulk, so a slow store gets fewer,
larger bulks (cheaper per document) and a slow provider gets one page per
write (lowest latency). Still one provider request in flight per worker,
which is what the mailbox's request slots count.

Nothing read ahead is applied or saved before the pages before it are: a
cursor is only saved after its page's writes are acknowledged, so pages
still in the read-ahead when the invocation stops are simply dropped and
read again by the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailsync.models import MessageBatch

Fetch = Callable[[str | None], MessageBatch]


@dataclass(frozen=True)
class _Item:
    batch: MessageBatch | None
    error: BaseException | None


class PageReader:
    """Fetches pages of one folder on a background thread, ``depth`` pages ahead at most.

    Use as a context manager; ``take()`` returns the next ready pages (at
    least one, waiting if needed); an error of the provider is raised from
    ``take()`` in order, after the pages before it. After an error or the
    round's last page the reader stops.
    """

    def __init__(self, fetch: Fetch, cursor: str | None, *, depth: int = 4, deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._deadline = deadline
        self._clock = clock
        self._cursor = cursor
        self._items: queue.Queue[_Item] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailsync-page-reader", daemon=True)
        self._done = False
        self._held_error: BaseException | None = None
        self._thread.start()

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        cursor = self._cursor
        first = True
        while not self._stop.is_set():
            if not first and self._deadline is not None and self._clock() >= self._deadline:
                # Past the invocation's end: more pages would be read for nothing.
                self._put(_Item(None, None))
                return
            first = False
            try:
                batch = self._fetch(cursor)
            except BaseException as error:  # handed to the engine thread, which decides
                self._put(_Item(None, error))
                return
            self._put(_Item(batch, None))
            if batch.complete:
                return
            cursor = batch.cursor

    def _put(self, item: _Item) -> None:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def take(self, max_messages: int) -> list[MessageBatch]:
        """The next page (waiting for it) plus any more already read, up to ``max_messages`` items.

        An empty list means the reader stopped at the deadline.
        """
        if self._done:
            raise RuntimeError("page reader is finished")
        if self._held_error is not None:
            self._done = True
            raise self._held_error
        item = self._items.get()
        if item.error is not None:
            self._done = True
            raise item.error
        if item.batch is None:
            self._done = True
            return []
        pages = [item.batch]
        count = _size(item.batch)
        while not pages[-1].complete and count < max_messages:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if item.error is not None:
                # The pages before the error are applied first; the error comes next time.
                self._held_error = item.error
                break
            if item.batch is None:
                self._done = True
                break
            pages.append(item.batch)
            count += _size(item.batch)
        if pages[-1].complete:
            self._done = True
        return pages

    def close(self) -> None:
        """Stop reading ahead and wait for a request in flight (so the slot count stays true)."""
        self._stop.set()
        self._thread.join()


def _size(batch: MessageBatch) -> int:
    return len(batch.upserts) + len(batch.removals)
