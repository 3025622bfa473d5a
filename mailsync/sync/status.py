"""The account's sync summary for ``GET /api/accounts/{id}`` (``SyncStatusReader``), from the sync table.

The rows say how far the sync got, but only for the store generation they
were written in: after the store was recreated (a lost or restored cluster,
an in-memory store restarted) they describe mail the store no longer holds.
Until the engine notices (its next job, or the poll tick's check) the
summary therefore counts such rows as not synced, so an account never reads
``synced`` over an empty store. The store's generation is read at most once
per ``GENERATION_TTL_S`` (the page polls this every second or two).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from mailsync.models import SyncPhase
from mailsync.storage.sync_rows import AccountSyncState, SyncState
from mailsync.storage.sync_table import SyncStateTable
from mailsync.sync.policy import store_lost

GENERATION_TTL_S = 5.0


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


def as_of_generation(rows: AccountSyncState, generation: str) -> AccountSyncState:
    """The rows as the store's ``generation`` sees them: a row of a lost store has no round and nothing indexed."""
    def fresh(row: SyncState) -> SyncState:
        if not store_lost(row, generation):
            return row
        return replace(row, rounds=0, indexed=0, phase=SyncPhase.INITIAL)

    folder_list = fresh(rows.folder_list) if rows.folder_list is not None else None
    return replace(rows, folder_list=folder_list, folders={k: fresh(v) for k, v in rows.folders.items()})


def _folder(row: SyncState) -> dict[str, Any]:
    return {
        "folder_id": row.folder_id, "name": row.name, "role": row.role, "phase": row.phase.value,
        "done": row.rounds > 0, "messages_indexed": row.indexed, "messages_expected": row.expected,
    }


class SyncStatus:
    """``SyncStatusReader``: one partition read per call, and the store's generation now and then."""

    def __init__(self, state: SyncStateTable, generation: Callable[[], str] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._generation = generation
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, str] | None = None

    def _current_generation(self) -> str | None:
        if self._generation is None:
            return None
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < GENERATION_TTL_S:
                return self._cached[1]
        generation = self._generation()  # StoreError propagates: the caller shows no summary
        with self._lock:
            self._cached = (now, generation)
        return generation

    def summary(self, account_id: str) -> dict[str, Any]:
        rows = self._state.load(account_id)
        generation = self._current_generation()
        lost = generation is not None and any(store_lost(row, generation) for row in (
            [rows.folder_list] if rows.folder_list else []) + list(rows.folders.values()))
        if generation is not None:
            rows = as_of_generation(rows, generation)
        folders = sorted(rows.folders.values(), key=lambda r: (r.role != "inbox", r.name.lower()))
        last = max([r.updated_at for r in folders] + [rows.folder_list.updated_at if rows.folder_list else 0.0])
        return {
            "phase": account_phase(rows),
            "store_recreated": lost,
            "folders_done": sum(1 for r in folders if r.rounds > 0),
            "folders_total": len(folders),
            "messages_indexed": sum(r.indexed for r in folders),
            "messages_expected": sum(r.expected or 0 for r in folders),
            "last_sync_at": _iso(last),
            "folders": [_folder(r) for r in folders],
        }
