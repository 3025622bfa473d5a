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
cursor is only saved after its page's writes are acknowledged (and those of
every page before it: ``mailsync.sync.page_writes`` keeps two writes in
flight and hands them back in order).

Outlook keeps only the newest few delta links of a folder (three in the
reports, microsoft-graph-docs #2162: "generation=518;[highest=523][523]
[521][522]"); every page read issues a new one and pushes the oldest out.
A saved link older than that answers SyncStateNotFound, and a large folder
would restart its round after every stop. Two rules keep the saved link
alive:

* the *window*: at most ``window`` pages are read (counting the request in
  flight) beyond the last one whose cursor is saved (``saved()``). With
  Outlook's 3 and a window of 2, the saved link is always among the newest
  three when the invocation stops, whatever stops it: the end of the time
  budget, a transient fault (the pages before it are written first, so the
  retry starts from the link of the failed request), a worker that dies.
  The next invocation's first request issues one more link, so a second
  death before that invocation saves a page can cost the link: Outlook
  then answers SyncStateNotFound and the folder's round starts over (always
  safe, only slower);
* ``drain()``: when the invocation stops, the pages already read are
  handed over to be written and their newest link saved, instead of being
  read again (and issuing new links) by the next invocation.
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
                 clock: Callable[[], float] = time.monotonic, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError("window must be at least 1")
        self._fetch = fetch
        self._deadline = deadline
        self._clock = clock
        self._cursor = cursor
        self._items: queue.Queue[_Item] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._window = window
        self._unsaved = 0                      # pages fetched (or in flight) whose cursor is not saved yet
        self._room = threading.Condition()
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
            if not self._wait_for_room():
                self._put(_Item(None, None))   # drained: no new link may be issued
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

    def _wait_for_room(self) -> bool:
        """Block until the window allows one more request; False when the reader is draining or stopped."""
        with self._room:
            while True:
                if self._finishing.is_set() or self._stop.is_set():
                    return False
                if self._window is None or self._unsaved < self._window:
                    self._unsaved += 1
                    return True
                self._room.wait(0.1)

    def waits_for_a_save(self) -> bool:
        """Nothing is read and the window allows no request until a cursor is saved.

        ``take()`` would then wait forever when the pages whose cursors are
        next to be saved are still being written: the caller saves first.
        (Also True, harmlessly, for the instant between a page's request
        and its hand-over.)
        """
        with self._room:
            return self._window is not None and self._unsaved >= self._window and self._items.empty()

    def saved(self, pages: int) -> None:
        """The cursors of ``pages`` more pages are saved: the window may move on."""
        with self._room:
            self._unsaved = max(0, self._unsaved - pages)
            self._room.notify_all()

    def drain(self) -> list[MessageBatch]:
        """Read nothing more; every page already read (the one in flight included), in order.

        For the end of an invocation: the caller writes them and saves the
        newest link, the one Outlook is sure to keep. Stops at the round's
        last page; an error after the pages is dropped (the next invocation
        meets it again, or not).
        """
        self._finishing.set()
        with self._room:
            self._room.notify_all()
        if self._done or self._held_error is not None:
            self._done = True
            return []
        pages: list[MessageBatch] = []
        while True:
            item = self._items.get()
            if item.batch is None:     # an error, or the end of reading
                break
            pages.append(item.batch)
            if item.batch.complete:
                break
        self._done = True
        return pages

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
        with self._room:
            self._room.notify_all()
        self._thread.join()


def _size(batch: MessageBatch) -> int:
    return len(batch.upserts) + len(batch.removals)
