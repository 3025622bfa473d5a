"""Sync-table writes without a lease, against Azurite (mailsync/storage/unleased_writes.py).

* rows are created once, in batches, keeping what exists;
* an account's rows are all deleted on unlink;
* a pending look-again covers a change only when it is not due too early;
* display fields of many rows are written together, skipping a row gone.
"""

from __future__ import annotations

import uuid

import pytest

from mailsync.storage.sync_rows import SyncState, new_owner
from mailsync.storage.sync_table import SyncStateTable
from tests.storage.sync_table_support import Clock, new_account, new_folder


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
    account = new_account()
    first = new_folder(table, account)
    again = table.create(SyncState(account_id=account, folder_id=first.folder_id, name="other"))
    assert again.name == "Inbox" and again.role == "inbox" and again.expected == 10
    loaded = table.load(account)
    assert set(loaded.folders) == {first.folder_id}
    assert loaded.folder_list is None


def test_insert_says_whether_the_row_is_ours(table: SyncStateTable) -> None:
    account = new_account()
    ours = table.insert(SyncState(account_id=account, folder_id=None, epoch=3))
    assert ours is not None and ours.epoch == 3 and ours.etag
    assert table.insert(SyncState(account_id=account, folder_id=None, epoch=4)) is None, "it exists: not ours"
    stored = table.get(account, None)
    assert stored is not None and stored.epoch == 3 and stored.etag == ours.etag


def test_delete_account_removes_every_row(table: SyncStateTable) -> None:
    account = new_account()
    new_folder(table, account, "a")
    new_folder(table, account, "b")
    table.create(SyncState(account_id=account, folder_id=None))
    table.acquire_slot(account, new_owner("x"), 4)
    assert table.delete_account(account) == 4
    loaded = table.load(account)
    assert not loaded.folders and loaded.folder_list is None and loaded.slots_busy == 0


def test_a_look_again_due_too_early_for_a_later_change_does_not_cover_it(table: SyncStateTable, clock: Clock) -> None:
    account = new_account()
    state = new_folder(table, account)
    assert table.schedule_relook(account, state.folder_id, at=clock.now + 2)
    clock.now += 0.5                          # another notified round, soon after: the pending one covers it
    assert not table.schedule_relook(account, state.folder_id, at=clock.now + 2)
    clock.now += 1.4                          # the pending one runs in 0.1 s, inside this change's lag
    assert table.schedule_relook(account, state.folder_id, at=clock.now + 2)
    clock.now += 5                            # nothing pending any more
    assert table.schedule_relook(account, state.folder_id, at=clock.now + 2)


def test_display_fields_of_many_rows_are_written_together_and_a_row_gone_is_skipped(table: SyncStateTable) -> None:
    account = new_account()
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
