"""Sync-table writes that need no lease: rows created, display fields, marks, look-agains, deletions.

What anyone may write on an account's rows whoever holds them: new folder rows
(onboarding, a folder found by the folder list), a folder's display fields, the
``dirty`` / ``resync_requested`` / ``not_before`` marks that ask for another round,
the claim of a folder's pending look-again, and deletions (a folder, an account's
every row, the pending notifications row once its job takes them). None of these
is a holder's field, so none disturbs a round in progress (``mailsync.storage.folder_leases``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, UpdateMode

from mailsync.errors import PendingChanged
from mailsync.storage.sync_rows import (
    FOLDER_LIST_ROW,
    PENDING_ROW,
    SyncState,
    all_fields,
    check_partition,
    folder_row_key,
    to_entity,
    to_entity_fields,
)
from mailsync.storage.sync_table_access import BATCH_MAX, CONFLICT_RETRIES, SyncTableAccess


class UnleasedWrites(SyncTableAccess):
    """Writes on an account's rows that need no lease (module docstring)."""

    def create(self, state: SyncState) -> SyncState:
        """Insert a row if it does not exist; return the stored row either way."""
        inserted = self.insert(state)
        if inserted is not None:
            return inserted
        existing = self.get(state.account_id, state.folder_id)
        if existing is None:  # deleted between the two calls: try once more
            return self.create(state)
        return existing

    def insert(self, state: SyncState) -> SyncState | None:
        """Insert a row that does not exist yet: the stored row, or None when the row exists already."""
        entity = to_entity(state, set(all_fields()))
        entity["PartitionKey"] = check_partition(state.account_id)
        entity["RowKey"] = state.row_key
        entity["updated_at"] = self._clock()
        try:
            meta = self._call(self._table.create_entity, entity)
        except ResourceExistsError:
            return None
        return replace(state, etag=meta.get("etag"), updated_at=entity["updated_at"])

    def create_many(self, states: Sequence[SyncState]) -> None:
        """Insert new rows of one account, up to 100 per entity-group transaction (one billed call each).

        Onboarding creates a row per folder; one batch instead of one call per
        folder. A batch is all-or-nothing: when any row already exists (a
        redelivered job created some), the batch is refused whole and the rows
        go one by one through ``create``, which keeps what is there.
        """
        if not states:
            return
        partition = check_partition(states[0].account_id)
        if any(state.account_id != states[0].account_id for state in states):
            raise ValueError("create_many takes the rows of one account (one partition)")
        now = self._clock()
        for start in range(0, len(states), BATCH_MAX):
            chunk = states[start:start + BATCH_MAX]
            operations: list[Any] = []
            for state in chunk:
                entity = to_entity(state, set(all_fields()))
                entity.update(PartitionKey=partition, RowKey=state.row_key, updated_at=now)
                operations.append(("create", entity))
            try:
                self._call(self._table.submit_transaction, operations)
            except (TableTransactionError, ResourceExistsError):
                for state in chunk:
                    self.create(state)

    def update_info(self, account_id: str, folder_id: str, *, name: str, role: str | None,
                    expected: int | None, parent_id: str | None = None, unread: int | None = None,
                    children: int | None = None) -> bool:
        """Refresh a folder's display fields (no lease needed; they are not the holder's)."""
        fields: dict[str, Any] = {"name": name, "role": role, "expected": expected, "parent_id": parent_id,
                                  "unread": unread, "children": children}
        return self._merge_unconditional(account_id, folder_row_key(folder_id), fields)

    def update_info_many(self, account_id: str, infos: Sequence[Mapping[str, Any]]) -> None:
        """``update_info`` for several folders of one account (each a mapping with ``folder_id`` and the
        fields ``update_info`` takes), up to 100 per entity-group transaction. A transaction refused (a
        row gone: a folder removed meanwhile) is written row by row, which skips the missing ones."""
        partition = check_partition(account_id)
        allowed = {"name", "role", "expected", "parent_id", "unread", "children"}
        rows: list[tuple[str, dict[str, Any]]] = []
        for info in infos:
            fields = {k: v for k, v in info.items() if k != "folder_id"}
            if set(fields) - allowed:
                raise ValueError(f"not display fields: {sorted(set(fields) - allowed)}")
            rows.append((folder_row_key(str(info["folder_id"])), fields))
        for start in range(0, len(rows), BATCH_MAX):
            chunk = rows[start:start + BATCH_MAX]
            now = self._clock()
            operations: list[Any] = [
                ("update", {**to_entity_fields(fields), "PartitionKey": partition, "RowKey": key, "updated_at": now},
                 {"mode": UpdateMode.MERGE}) for key, fields in chunk]
            if self._transaction(operations) is None:
                for key, fields in chunk:
                    self._merge_unconditional(account_id, key, fields)

    def mark(self, account_id: str, folder_id: str | None, *, dirty: bool = True,
             resync: bool = False, not_before: float | None = None) -> bool:
        """Record that a row needs another round (and maybe a resync). False when the row is gone."""
        fields: dict[str, Any] = {}
        if dirty:
            fields["dirty"] = True
        if resync:
            fields["resync_requested"] = True
        if not_before is not None:
            fields["not_before"] = float(not_before)
        key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
        return self._merge_unconditional(account_id, key, fields)

    def mark_many(self, account_id: str, folder_ids: Sequence[str | None], *, dirty: bool = True,
                  resync: bool = False) -> None:
        """``mark`` several rows of one account, up to 100 per entity-group transaction.

        A batch is all-or-nothing: when a row is gone (a folder deleted
        meanwhile) the batch is refused and its rows are marked one by one.
        """
        partition = check_partition(account_id)
        fields: dict[str, Any] = {}
        if dirty:
            fields["dirty"] = True
        if resync:
            fields["resync_requested"] = True
        if not fields:
            return
        keys = [FOLDER_LIST_ROW if fid is None else folder_row_key(fid) for fid in dict.fromkeys(folder_ids)]
        for start in range(0, len(keys), BATCH_MAX):
            chunk = keys[start:start + BATCH_MAX]
            now = self._clock()
            operations: list[Any] = [
                ("update", {**to_entity_fields(fields), "PartitionKey": partition, "RowKey": key, "updated_at": now},
                 {"mode": UpdateMode.MERGE}) for key in chunk]
            try:
                self._call(self._table.submit_transaction, operations)
            except (TableTransactionError, ResourceExistsError, ResourceNotFoundError):
                for key in chunk:
                    self._merge_unconditional(account_id, key, fields)

    def schedule_relook(self, account_id: str, folder_id: str | None, *, at: float,
                        slack_s: float = 1.0, known: SyncState | None = None) -> bool:
        """Claim the folder's pending look-again, due at ``at``; False when one due no more than
        ``slack_s`` earlier is pending already (notifications coalesce) or the folder is gone.

        A pending look-again due well before ``at`` does not cover the caller: it was
        scheduled for an earlier change and runs inside this change's delta lag, so it
        can find the earlier change, stop, and leave this one hidden until the next
        poll (a burst of 1,000 changes lost its last two that way). Then a later one is
        claimed too; during a burst that is at most one extra round per ``slack_s``.
        No lease needed: it is not the holder's field. ``known``: the row as the caller
        just read it (the claim is ETag-conditional, so a stale copy only costs a read)."""
        for attempt in range(CONFLICT_RETRIES):
            state = known if attempt == 0 and known is not None else self.get(account_id, folder_id)
            if state is None or (state.relook_at > self._clock() and state.relook_at >= at - slack_s):
                return False
            try:
                self._merge(state, {"relook_at": float(at)})
            except ResourceModifiedError:
                continue
            except ResourceNotFoundError:
                return False
            return True
        return False

    def delete(self, account_id: str, folder_id: str | None) -> None:
        key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
        with contextlib.suppress(ResourceNotFoundError):
            self._call(self._table.delete_entity, check_partition(account_id), key)

    def delete_account(self, account_id: str) -> int:
        """Delete every sync row of an account (unlink). Returns how many were deleted."""
        count = 0
        for entity in self._query(account_id):
            try:
                self._call(self._table.delete_entity, entity["PartitionKey"], entity["RowKey"])
                count += 1
            except ResourceNotFoundError:
                pass
        return count

    def take_pending(self, account_id: str, etag: str) -> None:
        """Delete the account's pending row if it is still as read (``etag``); ``PendingChanged`` when it
        changed (the caller must read it again). A row already gone is fine: someone took it."""
        try:
            self._call(self._table.delete_entity, check_partition(account_id), PENDING_ROW, etag=etag,
                       match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError as exc:
            raise PendingChanged("pending notifications changed since they were read") from exc
        except ResourceNotFoundError:
            pass
