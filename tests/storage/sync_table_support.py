"""What the sync table's tests share: a settable clock and new accounts and folders (fixtures: conftest.py)."""

from __future__ import annotations

import uuid

from mailsync.storage.sync_rows import SyncState
from mailsync.storage.sync_table import SyncStateTable


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_account() -> str:
    return uuid.uuid4().hex


def new_folder(table: SyncStateTable, account: str, folder: str = "AAMk/folder+1==") -> SyncState:
    return table.create(SyncState(account_id=account, folder_id=folder, name="Inbox", role="inbox", expected=10))
