"""The sync table's lease / dirty state machine, against Azurite (mailsync/storage/folder_leases.py).

* one holder at a time; a job that finds the row leased marks it dirty;
* the holder's ``finish`` sees dirty and keeps the lease for one more round;
* a redelivery of the same queue message may take over its own lease;
* an expired lease can be taken by anyone; the old holder's writes then fail;
* others' merges (dirty, resync, display fields) never make the holder lose
  its lease or its fields;
* rows are taken, given back and rested in batches that keep marks made meanwhile.
"""

from __future__ import annotations

import threading
import uuid

import pytest

from mailsync.errors import LeaseLost
from mailsync.models import SyncPhase
from mailsync.storage.sync_rows import SyncState, new_owner
from mailsync.storage.sync_table import SyncStateTable
from tests.storage.sync_table_support import Clock, new_account, new_folder


def test_a_lease_says_whether_it_was_taken_on_the_callers_copy_of_the_row(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    read = table.load(account).folders[folder]
    lease = table.acquire(account, folder, new_owner("msg-1"), known=read)
    assert lease is not None and lease.from_known, "unchanged since the read: taken on it"
    table.finish(lease)
    stale = table.load(account).folders[folder]
    table.mark(account, folder)                  # written after the caller's read
    again = table.acquire(account, folder, new_owner("msg-2"), known=stale)
    assert again is not None and not again.from_known, "taken on a fresh read of the changed row"
    assert again.state.dirty is False
    third = table.acquire(account, folder, new_owner("msg-3"))
    assert third is None, "held by msg-2"


def test_second_worker_marks_dirty_and_holder_runs_one_more_round(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
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
    account = new_account()
    folder = new_folder(table, account).folder_id
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
    account = new_account()
    folder = new_folder(table, account).folder_id
    dead = table.acquire(account, folder, new_owner("msg-7"))
    assert dead is not None
    retry = table.acquire(account, folder, new_owner("msg-7"))
    assert retry is not None and retry.owner != dead.owner
    with pytest.raises(LeaseLost):
        table.save(dead, cursor="from the dead worker")
    assert table.save(retry, cursor="ok").state.cursor == "ok"


def test_expired_lease_is_taken_and_old_holder_stops(table: SyncStateTable, clock: Clock) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    slow = table.acquire(account, folder, new_owner("a"))
    assert slow is not None
    clock.now += 61
    fresh = table.acquire(account, folder, new_owner("b"))
    assert fresh is not None
    with pytest.raises(LeaseLost):
        table.finish(slow, cursor="stale")
    assert table.get(account, folder).lease_owner == fresh.owner  # type: ignore[union-attr]


def test_save_renews_the_lease(table: SyncStateTable, clock: Clock) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    lease = table.acquire(account, folder, new_owner("a"))
    assert lease is not None
    clock.now += 50
    lease = table.save(lease, cursor="p1")
    clock.now += 50   # 100 s after acquire, 50 s after the save: still ours
    assert table.acquire(account, folder, new_owner("b")) is None


def test_deleted_row_is_lease_lost_folder_gone(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    lease = table.acquire(account, folder, new_owner("a"))
    assert lease is not None
    table.delete(account, folder)
    with pytest.raises(LeaseLost) as caught:
        table.save(lease, cursor="p")
    assert caught.value.code == "folder_gone"
    with pytest.raises(LeaseLost):
        table.acquire(account, folder, new_owner("b"))


def test_info_and_resync_marks_do_not_disturb_the_holder(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
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
    account = new_account()
    folder = new_folder(table, account).folder_id
    assert table.acquire(account, folder, new_owner("a")) is not None
    assert table.acquire(account, folder, new_owner("b"), mark_busy=False) is None
    assert not table.get(account, folder).dirty  # type: ignore[union-attr]


def test_release_keeps_dirty_for_the_next_worker(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
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
    account = new_account()
    folder = new_folder(table, account).folder_id
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
    account = new_account()
    folder = new_folder(table, account).folder_id
    first = table.acquire(account, folder, new_owner("a"))
    assert first is not None
    table.release(table.save(first, cursor="page-2-link"))
    notified = table.acquire(account, folder, new_owner("b"))
    assert notified is not None and notified.state.dirty
    assert table.finish(notified, cursor="delta-link", rounds=1) is not None, "one more round runs"
    quiet = table.acquire(account, folder, new_owner("c"), mark_busy=False)
    assert quiet is None, "still held by b for its extra round"


def test_a_mark_between_rounds_is_taken_by_the_next_holder(table: SyncStateTable) -> None:
    account = new_account()
    folder = new_folder(table, account).folder_id
    first = table.acquire(account, folder, new_owner("a"))
    assert first is not None
    assert table.finish(table.save(first, cursor="page-2-link"), cursor="delta-link", rounds=1) is None
    table.mark(account, folder)
    second = table.acquire(account, folder, new_owner("b"))
    assert second is not None and not second.state.dirty   # its round starts now: it sees the change
    assert table.finish(second, cursor="delta-link-2", rounds=2) is None


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
    account = new_account()
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
        table.rest_quiet([(rows[0], "x"), (SyncState(account_id=new_account(), folder_id="y", etag="e"), "y")])


def test_many_rows_are_taken_in_transactions_and_a_row_written_since_is_left_out(table: SyncStateTable) -> None:
    # A new account's first pass takes every small folder's lease and begins its round at once.
    account = new_account()
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
    account = new_account()
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
