"""PageWrites: a folder round's store writes in flight, handed back in the order they were started."""

from __future__ import annotations

import threading
import time

import pytest

from mailsync.models import Message, MessageBatch
from mailsync.sync.page_writes import PageWrites, page_ids


def _page(n: int, *ids: str, removals: tuple[str, ...] = ()) -> MessageBatch:
    return MessageBatch(tuple(Message("a", i, "f", 1) for i in ids), removals, f"c{n}", False)


def test_writes_run_together_and_come_back_in_the_order_they_were_started() -> None:
    first_may_end = threading.Event()
    second_ended = threading.Event()
    both_running = threading.Barrier(2, timeout=5)

    def write(pages: list[MessageBatch]) -> str:
        both_running.wait()          # the second write starts while the first is still in flight
        if pages[0].cursor == "c1":
            assert first_may_end.wait(5)
        else:
            second_ended.set()
        return pages[0].cursor

    writes: PageWrites[str] = PageWrites(write, depth=2)
    try:
        writes.start([_page(1, "a")])
        writes.start([_page(2, "b")])
        assert writes.full
        assert second_ended.wait(5)
        assert not writes.oldest_done(), "the second write ended first; the first is still in flight"
        first_may_end.set()
        assert writes.pop()[1] == "c1"
        assert writes.pop()[1] == "c2"
        assert len(writes) == 0
    finally:
        first_may_end.set()
        writes.close()


def test_a_failed_write_is_raised_in_its_turn_and_the_ones_behind_it_are_waited_for() -> None:
    finished: list[str] = []

    def write(pages: list[MessageBatch]) -> str:
        cursor = pages[0].cursor
        if cursor == "c1":
            raise RuntimeError("store refused page 1")
        time.sleep(0.05)
        finished.append(cursor)
        return cursor

    writes: PageWrites[str] = PageWrites(write, depth=2)
    try:
        writes.start([_page(1, "a")])
        writes.start([_page(2, "b")])
        with pytest.raises(RuntimeError, match="page 1"):
            writes.pop()
        assert [p.cursor for p in writes.last_failed] == ["c1"]
        assert [p.cursor for p in writes.abandon()] == ["c2"]
        assert finished == ["c2"], "abandon returns only once the write behind the failed one has ended"
        assert len(writes) == 0
    finally:
        writes.close()


def test_pages_naming_a_message_in_flight_overlap() -> None:
    gate = threading.Event()

    def write(pages: list[MessageBatch]) -> None:
        gate.wait(5)

    writes: PageWrites[None] = PageWrites(write, depth=2)
    try:
        writes.start([_page(1, "a", "b", removals=("r",))])
        assert writes.overlaps([_page(2, "b")])
        assert writes.overlaps([_page(2, "c", removals=("a",))])   # a removal of an upsert in flight
        assert writes.overlaps([_page(2, "r")])                    # an upsert of a removal in flight
        assert not writes.overlaps([_page(2, "c", "d", removals=("e",))])
        assert page_ids([_page(1, "a", removals=("x",)), _page(2, "b")]) == {"a", "b", "x"}
    finally:
        gate.set()
        writes.close()


def test_no_room_beyond_depth_and_close_waits_for_writes_in_flight() -> None:
    ended: list[str] = []

    def write(pages: list[MessageBatch]) -> None:
        time.sleep(0.05)
        ended.append(pages[0].cursor)

    writes: PageWrites[None] = PageWrites(write, depth=1)
    writes.start([_page(1, "a")])
    with pytest.raises(RuntimeError):
        writes.start([_page(2, "b")])
    writes.close()
    assert ended == ["c1"]
    with pytest.raises(ValueError):
        PageWrites(write, depth=0)
