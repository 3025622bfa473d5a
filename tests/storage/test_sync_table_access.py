"""The sync table's reads and keys, against Azurite (mailsync/storage/sync_table_access.py).

* any folder id round-trips through its RowKey; an account id the table cannot key is an InputError;
* the folders' epochs read row by row or by partition give the same answer.
"""

from __future__ import annotations

import pytest

from mailsync.errors import InputError
from mailsync.storage.sync_rows import SyncState, folder_row_key
from mailsync.storage.sync_table import SyncStateTable
from mailsync.storage.sync_table_access import POINT_READS_UP_TO
from tests.storage.sync_table_support import new_account, new_folder


def test_folder_ids_with_key_forbidden_characters_round_trip(table: SyncStateTable) -> None:
    account = new_account()
    odd = "AQMk/ADAw#?\\x"
    new_folder(table, account, odd)
    assert table.get(account, odd) is not None
    assert "/" not in folder_row_key(odd)


def test_bad_account_id_is_an_input_error(table: SyncStateTable) -> None:
    with pytest.raises(InputError):
        table.load("a/b")


def test_epochs_of_a_few_folders_or_of_many_give_the_same_answer(table: SyncStateTable) -> None:
    """Up to POINT_READS_UP_TO folders are read one row each; more in one partition query (a bulk action's)."""
    account = new_account()
    for n in range(5):
        table.create(SyncState(account_id=account, folder_id=f"f{n}", name=f"folder {n}", epoch=10 + n))
    assert table.epochs(account, ["f1"]) == {"f1": 11}
    assert table.epochs(account, ["f3", "gone"]) == {"f3": 13}
    many = ["f0", "f2", "f3", "f4", "gone"]
    assert len(many) > POINT_READS_UP_TO
    assert table.epochs(account, many) == {"f0": 10, "f2": 12, "f3": 13, "f4": 14}
    assert table.epochs(account) == {f"f{n}": 10 + n for n in range(5)}
