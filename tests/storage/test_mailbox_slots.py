"""A mailbox's request slots, against Azurite (mailsync/storage/mailbox_slots.py).

* at most N slots per mailbox, freed by release or by expiry, never overbooked by racing workers;
* a slot and a folder's lease are taken together from the rows just loaded, or not at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mailsync.storage.sync_rows import new_owner
from mailsync.storage.sync_table import SyncStateTable
from tests.storage.sync_table_support import Clock, new_account, new_folder


def test_at_most_n_slots_and_expiry_frees_them(table: SyncStateTable, clock: Clock) -> None:
    account = new_account()
    slots = [table.acquire_slot(account, new_owner(f"m{i}"), 4) for i in range(4)]
    assert all(slots)
    assert table.acquire_slot(account, new_owner("m9"), 4) is None
    assert table.load(account).slots_busy == 4
    table.release_slot(slots[0])  # type: ignore[arg-type]
    freed = table.acquire_slot(account, new_owner("m10"), 4)
    assert freed is not None
    assert table.acquire_slot(account, new_owner("m11"), 4) is None
    clock.now += 121
    assert table.acquire_slot(account, new_owner("m12"), 4) is not None


def _race(workers: int, take: Callable[[int], list[Any]]) -> list[Any]:
    """Run ``take(0..workers-1)`` in as many threads at once; everything they took that is not None."""
    got: list[Any] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        taken = take(i)
        with lock:
            got.extend(taken)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [t for t in got if t is not None]


def test_slots_are_not_overbooked_by_concurrent_workers(table: SyncStateTable) -> None:
    account = new_account()
    taken = _race(10, lambda i: [table.acquire_slot(account, new_owner(f"w{i}"), 4)])
    assert len(taken) == 4
    assert len({slot.index for slot in taken}) == 4


def test_several_free_slots_are_taken_at_once_and_never_overbooked(table: SyncStateTable, clock: Clock) -> None:
    """A bulk action takes the mailbox's free slots in one transaction (ActionWorker._take_slots)."""
    account = new_account()
    held = table.acquire_slot(account, new_owner("sync"), 4)
    assert held is not None
    taken = table.acquire_slots(account, [new_owner(f"bulk{i}") for i in range(4)], 4)
    assert len(taken) == 3 and held.index not in {slot.index for slot in taken}
    assert table.load(account).slots_busy == 4
    assert table.acquire_slots(account, [new_owner("late")], 4) == []
    for slot in taken:
        table.release_slot(slot)
    clock.now += 121                                     # the sync's slot expired: free again
    assert sorted(slot.index for slot in table.acquire_slots(account, [new_owner(f"again{i}") for i in range(4)],
                                                             4)) == [0, 1, 2, 3]


def test_slots_taken_at_once_race_with_single_takes_without_overbooking(table: SyncStateTable) -> None:
    account = new_account()
    taken = _race(8, lambda i: (table.acquire_slots(account, [new_owner(f"b{i}-{k}") for k in range(4)], 4) if i % 2
                                else [table.acquire_slot(account, new_owner(f"w{i}"), 4)]))
    assert len(taken) == 4
    assert len({slot.index for slot in taken}) == 4


def test_redelivery_reclaims_its_slot(table: SyncStateTable) -> None:
    account = new_account()
    for i in range(4):
        assert table.acquire_slot(account, new_owner(f"m{i}"), 4) is not None
    assert table.acquire_slot(account, new_owner("m2"), 4) is not None


def test_slot_and_lease_are_taken_together_from_the_rows_just_loaded(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    assert folder is not None
    owner = new_owner("msg-1")
    taken = table.take_slot_and_lease(table.load(account), folder, owner, 4)
    assert taken is not None
    slot, lease = taken
    loaded = table.load(account)
    assert loaded.slots_busy == 1 and loaded.folders[folder].lease_owner == owner
    assert lease.state.etag == loaded.folders[folder].etag, "the lease's ETag is the row's: the holder writes on"
    saved = table.save(lease, cursor="c1")
    # Another job meanwhile: the folder is leased, so it takes neither and goes the one-by-one way.
    assert table.take_slot_and_lease(table.load(account), folder, new_owner("msg-2"), 4) is None
    assert table.acquire(account, folder, new_owner("msg-2")) is None and table.get(account, folder).dirty  # type: ignore[union-attr]
    # The round's finish gives the slot back with the lease, unless the row must run again.
    again, slot_back = table.finish_and_release_slot(saved, slot, cursor="c2")
    assert again is not None and not slot_back, "dirty was set after our last write: one more round, slot kept"
    done, slot_back = table.finish_and_release_slot(again, slot, cursor="c3")
    assert done is None and slot_back
    final = table.load(account)
    assert final.slots_busy == 0 and final.folders[folder].lease_owner == "" and final.folders[folder].cursor == "c3"


def test_taking_both_from_stale_rows_writes_nothing(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    assert folder is not None
    stale = table.load(account)
    table.mark(account, folder, dirty=True)                  # the folder row changed since it was read
    assert table.take_slot_and_lease(stale, folder, new_owner("msg-1"), 4) is None
    loaded = table.load(account)
    assert loaded.slots_busy == 0 and loaded.folders[folder].lease_owner == "", "all or nothing"
    slots = [table.acquire_slot(account, new_owner(f"m{i}"), 4) for i in range(4)]
    assert all(slots)
    assert table.take_slot_and_lease(table.load(account), folder, new_owner("msg-2"), 4) is None, "no slot free"
    assert table.load(account).folders[folder].lease_owner == ""


def test_a_slot_and_lease_transaction_never_overbooks_slots(table: SyncStateTable) -> None:
    account = new_account()
    folders = [new_folder(table, account, f"f{n}").folder_id for n in range(8)]
    rows = table.load(account)
    # All from the same read.
    taken = _race(8, lambda i: [table.take_slot_and_lease(rows, folders[i] or "", new_owner(f"w{i}"), 4)])
    assert 1 <= len(taken) <= 4
    assert table.load(account).slots_busy == len(taken)
