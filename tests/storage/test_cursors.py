"""The sync table's lease / dirty / slot state machine, against Azurite.

The rules under test (mailsync/storage/cursors.py):
* one holder at a time; a job that finds the row leased marks it dirty;
* the holder's ``finish`` sees dirty and keeps the lease for one more round;
* a redelivery of the same queue message may take over its own lease;
* an expired lease can be taken by anyone; the old holder's writes then fail;
* others' merges (dirty, resync, display fields) never make the holder lose
  its lease or its fields;
* at most N slots per mailbox, freed by release or by expiry.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mailsync.errors import InputError, LeaseLost
from mailsync.models import SyncPhase
from mailsync.settings import Settings
from mailsync.storage.cursors import POINT_READS_UP_TO, SyncStateTable
from mailsync.storage.sync_rows import SyncState, folder_row_key, new_owner
from tests.sync.support import sync_table


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(storage_settings: Settings, clock: Clock) -> SyncStateTable:
    return sync_table(storage_settings, lease_s=60.0, slot_ttl_s=120.0, clock=clock)


def _account() -> str:
    return uuid.uuid4().hex


def _folder(table: SyncStateTable, account: str, folder: str = "AAMk/folder+1==") -> SyncState:
    return table.create(SyncState(account_id=account, folder_id=folder, name="Inbox", role="inbox", expected=10))


def test_create_many_inserts_in_batches_and_keeps_rows_that_exist(table: SyncStateTable) -> None:
    account = uuid.uuid4().hex
    first = table.create(SyncState(account_id=account, folder_id="f0", name="kept"))
    rows = [SyncState(account_id=account, folder_id=f"f{n}", name=f"new {n}", expected=n) for n in range(150)]
    table.create_many(rows)                       # 2 batches; the first is refused (f0 exists), then one by one
    loaded = table.load(account)
    assert sorted(loaded.folders) == sorted(f"f{n}" for n in range(150))
    assert loaded.folders["f0"].name == "kept" and loaded.folders["f0"].etag == first.etag
    assert loaded.folders["f149"].name == "new 149" and loaded.folders["f149"].expected == 149
    with pytest.raises(ValueError):
        table.create_many([SyncState(account_id=account, folder_id="x"), SyncState(account_id="other", folder_id="y")])


def test_create_is_idempotent_and_keeps_fields(table: SyncStateTable) -> None:
    account = _account()
    first = _folder(table, account)
    again = table.create(SyncState(account_id=account, folder_id=first.folder_id, name="other"))
    assert again.name == "Inbox" and again.role == "inbox" and again.expected == 10
    loaded = table.load(account)
    assert set(loaded.folders) == {first.folder_id}
    assert loaded.folder_list is None


def test_folder_ids_with_key_forbidden_characters_round_trip(table: SyncStateTable) -> None:
    account = _account()
    odd = "AQMk/ADAw#?\\x"
    _folder(table, account, odd)
    assert table.get(account, odd) is not None
    assert "/" not in folder_row_key(odd)


def test_bad_account_id_is_an_input_error(table: SyncStateTable) -> None:
    with pytest.raises(InputError):
        table.load("a/b")


def test_second_worker_marks_dirty_and_holder_runs_one_more_round(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    holder = table.acquire(account, folder, new_owner("msg-1"))
    assert holder is not None
    assert table.acquire(account, folder, new_owner("msg-2")) is None
    assert table.get(account, folder).dirty  # type: ignore[union-attr]
    # The holder saves a page: the other's dirty mark survives the merge.
    holder = table.save(holder, cursor="c1", indexed=5)
    assert holder.state.dirty and holder.state.cursor == "c1"
    again = table.finish(holder, cursor="c2", phase=SyncPhase.INCREMENTAL, rounds=1)
    assert again is not None, "dirty set during the round: one more round"
    assert not again.state.dirty
    assert table.finish(again, cursor="c3") is None
    final = table.get(account, folder)
    assert final is not None
    assert final.lease_owner == "" and final.cursor == "c3" and final.rounds == 1 and not final.dirty


def test_dirty_mark_racing_the_release_is_never_lost(table: SyncStateTable) -> None:
    """Whatever the interleaving, either the holder sees dirty or the marker gets the lease."""
    account = _account()
    folder = _folder(table, account).folder_id
    for _ in range(10):
        holder = table.acquire(account, folder, new_owner(uuid.uuid4().hex))
        assert holder is not None
        results: dict[str, object] = {}

        def mark(into: dict[str, object]) -> None:
            into["other"] = table.acquire(account, folder, new_owner(uuid.uuid4().hex))

        thread = threading.Thread(target=mark, args=(results,))
        thread.start()
        results["finish"] = table.finish(holder, cursor="x")
        thread.join()
        other, finish = results["other"], results["finish"]
        # Exactly one of: the other took the lease, or the holder must run again, or
        # the other ran entirely before the holder's first conditional write and saw... the
        # holder still holding, so it marked dirty -> finish returns a lease.
        assert (other is not None) != (finish is not None)
        leftover = other or finish
        assert table.finish(leftover, cursor="y") is None  # type: ignore[arg-type]


def test_redelivery_of_the_same_message_takes_over_its_lease(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    dead = table.acquire(account, folder, new_owner("msg-7"))
    assert dead is not None
    retry = table.acquire(account, folder, new_owner("msg-7"))
    assert retry is not None and retry.owner != dead.owner
    with pytest.raises(LeaseLost):
        table.save(dead, cursor="from the dead worker")
    assert table.save(retry, cursor="ok").state.cursor == "ok"


def test_expired_lease_is_taken_and_old_holder_stops(table: SyncStateTable, clock: Clock) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    slow = table.acquire(account, folder, new_owner("a"))
    assert slow is not None
    clock.now += 61
    fresh = table.acquire(account, folder, new_owner("b"))
    assert fresh is not None
    with pytest.raises(LeaseLost):
        table.finish(slow, cursor="stale")
    assert table.get(account, folder).lease_owner == fresh.owner  # type: ignore[union-attr]


def test_save_renews_the_lease(table: SyncStateTable, clock: Clock) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    lease = table.acquire(account, folder, new_owner("a"))
    assert lease is not None
    clock.now += 50
    lease = table.save(lease, cursor="p1")
    clock.now += 50   # 100 s after acquire, 50 s after the save: still ours
    assert table.acquire(account, folder, new_owner("b")) is None


def test_deleted_row_is_lease_lost_folder_gone(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    lease = table.acquire(account, folder, new_owner("a"))
    assert lease is not None
    table.delete(account, folder)
    with pytest.raises(LeaseLost) as caught:
        table.save(lease, cursor="p")
    assert caught.value.code == "folder_gone"
    with pytest.raises(LeaseLost):
        table.acquire(account, folder, new_owner("b"))


def test_info_and_resync_marks_do_not_disturb_the_holder(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    lease = table.acquire(account, folder, new_owner("a"))
    assert lease is not None
    assert table.update_info(account, folder, name="Renamed", role="inbox", expected=11, parent_id="p",
                             unread=3, children=0)
    assert table.mark(account, folder, dirty=False, resync=True)
    lease = table.save(lease, cursor="p2", epoch=7)
    assert lease.state.resync_requested and lease.state.name == "Renamed"
    lease = table.save(lease, resync_requested=False, cursor="")
    assert not lease.state.resync_requested and lease.state.cursor is None
    row = table.get(account, folder)
    assert row is not None and row.epoch == 7 and row.name == "Renamed" and row.unread == 3


def test_quiet_acquire_does_not_mark(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    assert table.acquire(account, folder, new_owner("a")) is not None
    assert table.acquire(account, folder, new_owner("b"), mark_busy=False) is None
    assert not table.get(account, folder).dirty  # type: ignore[union-attr]


def test_release_keeps_dirty_for_the_next_worker(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    lease = table.acquire(account, folder, new_owner("a"))
    assert lease is not None
    table.mark(account, folder)
    table.release(lease, failures=2)
    row = table.get(account, folder)
    assert row is not None and row.dirty and row.failures == 2 and not row.lease_owner


def test_a_mark_made_in_mid_round_outlives_the_next_holder_until_the_round_ends(table: SyncStateTable) -> None:
    # The round's first holder saved a page link and left (time budget); the mark made meanwhile asks
    # for a round that starts after it. The next holder goes on with the old round: it keeps the mark,
    # and the round's end hands the lease back for one more round.
    account = _account()
    folder = _folder(table, account).folder_id
    first = table.acquire(account, folder, new_owner("a"))
    assert first is not None
    first = table.save(first, cursor="page-2-link")
    table.mark(account, folder)
    table.release(first)
    second = table.acquire(account, folder, new_owner("b"))
    assert second is not None and second.state.dirty and second.state.mid_round
    second = table.save(second, cursor="page-3-link")
    again = table.finish(second, cursor="delta-link", rounds=1)
    assert again is not None, "one more round runs"
    assert not again.state.dirty and not again.state.mid_round
    assert table.finish(again, cursor="delta-link-2", rounds=2) is None


def test_a_job_with_news_that_takes_a_row_in_mid_round_asks_for_one_more_round(table: SyncStateTable) -> None:
    # A notification's job finds the folder free but in mid-round (its worker ran out of time): it goes
    # on with that round, which began before the notified change, so the round's end runs another.
    account = _account()
    folder = _folder(table, account).folder_id
    first = table.acquire(account, folder, new_owner("a"))
    assert first is not None
    table.release(table.save(first, cursor="page-2-link"))
    notified = table.acquire(account, folder, new_owner("b"))
    assert notified is not None and notified.state.dirty
    assert table.finish(notified, cursor="delta-link", rounds=1) is not None, "one more round runs"
    quiet = table.acquire(account, folder, new_owner("c"), mark_busy=False)
    assert quiet is None, "still held by b for its extra round"


def test_a_mark_between_rounds_is_taken_by_the_next_holder(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
    first = table.acquire(account, folder, new_owner("a"))
    assert first is not None
    assert table.finish(table.save(first, cursor="page-2-link"), cursor="delta-link", rounds=1) is None
    table.mark(account, folder)
    second = table.acquire(account, folder, new_owner("b"))
    assert second is not None and not second.state.dirty   # its round starts now: it sees the change
    assert table.finish(second, cursor="delta-link-2", rounds=2) is None


def test_at_most_n_slots_and_expiry_frees_them(table: SyncStateTable, clock: Clock) -> None:
    account = _account()
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
    account = _account()
    taken = _race(10, lambda i: [table.acquire_slot(account, new_owner(f"w{i}"), 4)])
    assert len(taken) == 4
    assert len({slot.index for slot in taken}) == 4


def test_several_free_slots_are_taken_at_once_and_never_overbooked(table: SyncStateTable, clock: Clock) -> None:
    """A bulk action takes the mailbox's free slots in one transaction (ActionWorker._take_slots)."""
    account = _account()
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
    account = _account()
    taken = _race(8, lambda i: (table.acquire_slots(account, [new_owner(f"b{i}-{k}") for k in range(4)], 4) if i % 2
                                else [table.acquire_slot(account, new_owner(f"w{i}"), 4)]))
    assert len(taken) == 4
    assert len({slot.index for slot in taken}) == 4


def test_redelivery_reclaims_its_slot(table: SyncStateTable) -> None:
    account = _account()
    for i in range(4):
        assert table.acquire_slot(account, new_owner(f"m{i}"), 4) is not None
    assert table.acquire_slot(account, new_owner("m2"), 4) is not None


def test_delete_account_removes_every_row(table: SyncStateTable) -> None:
    account = _account()
    _folder(table, account, "a")
    _folder(table, account, "b")
    table.create(SyncState(account_id=account, folder_id=None))
    table.acquire_slot(account, new_owner("x"), 4)
    assert table.delete_account(account) == 4
    loaded = table.load(account)
    assert not loaded.folders and loaded.folder_list is None and loaded.slots_busy == 0


def test_a_look_again_due_too_early_for_a_later_change_does_not_cover_it(table: SyncStateTable, clock: Clock) -> None:
    account = _account()
    state = _folder(table, account)
    assert table.schedule_relook(account, state.folder_id, at=clock.now + 2)
    clock.now += 0.5                          # another notified round, soon after: the pending one covers it
    assert not table.schedule_relook(account, state.folder_id, at=clock.now + 2)
    clock.now += 1.4                          # the pending one runs in 0.1 s, inside this change's lag
    assert table.schedule_relook(account, state.folder_id, at=clock.now + 2)
    clock.now += 5                            # nothing pending any more
    assert table.schedule_relook(account, state.folder_id, at=clock.now + 2)


def test_slot_and_lease_are_taken_together_from_the_rows_just_loaded(table: SyncStateTable) -> None:
    account = _account()
    folder = _folder(table, account).folder_id
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
    account = _account()
    folder = _folder(table, account).folder_id
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
    account = _account()
    folders = [_folder(table, account, f"f{n}").folder_id for n in range(8)]
    rows = table.load(account)
    # All from the same read.
    taken = _race(8, lambda i: [table.take_slot_and_lease(rows, folders[i] or "", new_owner(f"w{i}"), 4)])
    assert 1 <= len(taken) <= 4
    assert table.load(account).slots_busy == len(taken)


def test_epochs_of_a_few_folders_or_of_many_give_the_same_answer(table: SyncStateTable) -> None:
    """Up to POINT_READS_UP_TO folders are read one row each; more in one partition query (a bulk action's)."""
    account = _account()
    for n in range(5):
        table.create(SyncState(account_id=account, folder_id=f"f{n}", name=f"folder {n}", epoch=10 + n))
    assert table.epochs(account, ["f1"]) == {"f1": 11}
    assert table.epochs(account, ["f3", "gone"]) == {"f3": 13}
    many = ["f0", "f2", "f3", "f4", "gone"]
    assert len(many) > POINT_READS_UP_TO
    assert table.epochs(account, many) == {"f0": 10, "f2": 12, "f3": 13, "f4": 14}
    assert table.epochs(account) == {f"f{n}": 10 + n for n in range(5)}


def _resting(table: SyncStateTable, account: str, folder: str) -> SyncState:
    """A folder between incremental rounds, marked by a sweep (as ``mark_many`` leaves it)."""
    table.create(SyncState(account_id=account, folder_id=folder, name=folder))
    lease = table.acquire(account, folder, new_owner("first"))
    assert lease is not None
    assert table.finish(lease, cursor=f"{folder}-c1", phase=SyncPhase.INCREMENTAL, rounds=1) is None
    table.mark_many(account, [folder])
    row = table.get(account, folder)
    assert row is not None and row.dirty
    return row


def test_quiet_rounds_rest_together_and_a_row_written_since_its_read_keeps_its_mark(table: SyncStateTable) -> None:
    account = _account()
    rows = [_resting(table, account, f"f{n}") for n in range(3)]
    # f1 is leased by a notified round after the sweep read it: its write must not go through.
    taken = table.acquire(account, "f1", new_owner("notified"))
    assert taken is not None
    written = table.rest_quiet([(row, f"{row.folder_id}-c2") for row in rows])
    assert written == 2, "the transaction is refused for f1; the others go through one by one"
    after = table.load(account).folders
    for folder in ("f0", "f2"):
        assert (after[folder].cursor, after[folder].rounds, after[folder].dirty) == (f"{folder}-c2", 2, False)
        assert after[folder].lease_owner == ""
    assert after["f1"].cursor == "f1-c1" and after["f1"].lease_owner == taken.owner, "its holder's, untouched"
    # Nothing written since the read: one transaction for all of them.
    again = [row for row in table.load(account).folders.values() if row.folder_id != "f1"]
    assert table.rest_quiet([(row, f"{row.folder_id}-c3") for row in again]) == 2
    assert {f: r.cursor for f, r in table.load(account).folders.items()} == {"f0": "f0-c3", "f1": "f1-c1",
                                                                             "f2": "f2-c3"}
    with pytest.raises(ValueError):
        table.rest_quiet([(rows[0], "x"), (SyncState(account_id=_account(), folder_id="y", etag="e"), "y")])


def test_many_rows_are_taken_in_transactions_and_a_row_written_since_is_left_out(table: SyncStateTable) -> None:
    # A new account's first pass takes every small folder's lease and begins its round at once.
    account = _account()
    table.create_many([SyncState(account_id=account, folder_id=f"f{n}", name=f"n{n}", expected=0)
                       for n in range(120)])
    rows = table.load(account)
    table.mark(account, "f110")                       # written since the read: its chunk (100-119) is refused
    owner = new_owner("pass")
    taken = table.take_many([rows.folders[f"f{n}"] for n in range(120)], owner, cursor="",
                            phase=SyncPhase.INITIAL, epoch=7, round_started=5.0)
    assert sorted(lease.state.folder_id or "" for lease in taken) == sorted(f"f{n}" for n in range(100))
    after = table.load(account)
    assert all(after.folders[f"f{n}"].lease_owner == owner and after.folders[f"f{n}"].epoch == 7
               and after.folders[f"f{n}"].round_started == 5.0 for n in range(100))
    assert not after.folders["f105"].lease_owner and after.folders["f110"].dirty
    # Leased now: another worker's acquire only marks; a second take of the same read is refused.
    assert table.acquire(account, "f3", new_owner("other")) is None
    assert table.take_many([rows.folders["f4"]], new_owner("late")) == []
    with pytest.raises(ValueError):
        table.take_many([rows.folders["f0"]], owner, dirty=True)    # not a holder field


def test_many_leases_go_back_together_and_marks_made_meanwhile_stay(table: SyncStateTable) -> None:
    account = _account()
    table.create_many([SyncState(account_id=account, folder_id=f"f{n}", expected=0) for n in range(3)])
    rows = table.load(account)
    taken = table.take_many(list(rows.folders.values()), new_owner("pass"), cursor="", round_started=5.0)
    ends = [(lease, {"cursor": f"delta-{lease.state.folder_id}", "phase": SyncPhase.INCREMENTAL, "rounds": 1})
            for lease in taken]
    assert table.release_many(ends) == []
    after = table.load(account)
    assert all(row.rounds == 1 and row.cursor == f"delta-{f}" and not row.lease_owner and not row.dirty
               for f, row in after.folders.items())
    # A notification marks one row while the pass runs, and one folder is deleted: the transaction is
    # refused, the rows go back one by one, the mark stays (its round runs next), the deleted one is named.
    taken = table.take_many(list(after.folders.values()), new_owner("pass-2"), round_started=6.0)
    table.mark(account, "f1")
    table.delete(account, "f2")
    gone = table.release_many([(lease, {"rounds": 2}) for lease in taken])
    assert gone == ["f2"]
    final = table.load(account)
    assert set(final.folders) == {"f0", "f1"}
    assert final.folders["f1"].dirty and final.folders["f1"].rounds == 2 and not final.folders["f1"].lease_owner
    assert final.folders["f0"].rounds == 2 and not final.folders["f0"].dirty


def test_display_fields_of_many_rows_are_written_together_and_a_row_gone_is_skipped(table: SyncStateTable) -> None:
    account = _account()
    table.create_many([SyncState(account_id=account, folder_id=f"f{n}", name=f"n{n}") for n in range(3)])
    lease = table.acquire(account, "f0", new_owner("holder"))
    assert lease is not None
    table.update_info_many(account, [{"folder_id": "f0", "name": "Sent", "role": "sentitems", "expected": 4},
                                     {"folder_id": "f1", "name": "Junk", "role": "junkemail", "expected": None}])
    rows = table.load(account).folders
    assert (rows["f0"].name, rows["f0"].role, rows["f0"].expected) == ("Sent", "sentitems", 4)
    assert (rows["f1"].name, rows["f1"].role, rows["f1"].expected) == ("Junk", "junkemail", None)
    assert rows["f0"].lease_owner == lease.owner, "display fields are not the holder's: the lease stays"
    table.delete(account, "f2")
    table.update_info_many(account, [{"folder_id": "f2", "name": "gone"}, {"folder_id": "f1", "name": "Spam"}])
    rows = table.load(account).folders
    assert set(rows) == {"f0", "f1"} and rows["f1"].name == "Spam"
    with pytest.raises(ValueError):
        table.update_info_many(account, [{"folder_id": "f1", "cursor": "x"}])
