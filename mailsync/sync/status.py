"""The account's sync summary for ``GET /api/accounts/{id}`` (``SyncStatusReader``), from the sync table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mailsync.models import SyncPhase
from mailsync.storage.cursors import AccountSyncState, SyncState, SyncStateTable


def _iso(epoch_s: float) -> str | None:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat() if epoch_s > 0 else None


def account_phase(rows: AccountSyncState) -> str:
    """pending | folders | initial | resync | synced — the account as a whole."""
    if rows.folder_list is None:
        return "pending"
    if rows.folder_list.rounds == 0:
        return "folders"
    folders = list(rows.folders.values())
    if any(row.rounds == 0 for row in folders):
        return SyncPhase.INITIAL.value
    if any(row.phase == SyncPhase.RESYNC for row in folders):
        return SyncPhase.RESYNC.value
    return "synced"


def _folder(row: SyncState) -> dict[str, Any]:
    return {
        "folder_id": row.folder_id, "name": row.name, "role": row.role, "phase": row.phase.value,
        "done": row.rounds > 0, "messages_indexed": row.indexed, "messages_expected": row.expected,
    }


class SyncStatus:
    """``SyncStatusReader``: one partition read per call, no store or provider access."""

    def __init__(self, state: SyncStateTable) -> None:
        self._state = state

    def summary(self, account_id: str) -> dict[str, Any]:
        rows = self._state.load(account_id)
        folders = sorted(rows.folders.values(), key=lambda r: (r.role != "inbox", r.name.lower()))
        last = max([r.updated_at for r in folders] + [rows.folder_list.updated_at if rows.folder_list else 0.0])
        return {
            "phase": account_phase(rows),
            "folders_done": sum(1 for r in folders if r.rounds > 0),
            "folders_total": len(folders),
            "messages_indexed": sum(r.indexed for r in folders),
            "messages_expected": sum(r.expected or 0 for r in folders),
            "last_sync_at": _iso(last),
            "folders": [_folder(r) for r in folders],
        }
