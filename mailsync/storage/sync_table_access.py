"""The sync table's access layer: its client, an account's rows read, and the writes every rule is made of.

``SyncTableAccess`` is what the rule modules build on (``mailsync.storage.sync_table``
lists the table's rows and assembles ``SyncStateTable`` from them): the table client
and its settings (lease and slot lengths, the clock), the reads (an account's whole
partition, one row, the folders' epochs), and the plumbing of writing a row: merges
conditional on an ETag or not, entity-group transactions, and the mapping of the
service's errors to ``DependencyUnavailable`` or to the conflicts the rules decide on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, UpdateMode

from mailsync.errors import DependencyUnavailable
from mailsync.storage.rest.table import RestTable
from mailsync.storage.sync_rows import (
    FOLDER_LIST_ROW,
    FOLDER_ROW_PREFIX,
    SLOT_ROW_PREFIX,
    AccountSyncState,
    SlotRow,
    SyncState,
    check_partition,
    folder_row_key,
    from_entity,
    slot_row_from_entity,
    to_entity_fields,
)

CONFLICT_RETRIES = 20
BATCH_MAX = 100   # operations per entity-group transaction (Azure Tables' limit)

# Above this many folders, ``epochs`` reads the account's partition in one query instead of a row each.
POINT_READS_UP_TO = 2


class SyncTableAccess:
    """The table client, the reads and the write plumbing the sync table's rules share. Thread-safe (the
    table client is)."""

    def __init__(self, table: RestTable, *, lease_s: float = 300.0, slot_ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._lease_s = lease_s
        self._slot_ttl_s = slot_ttl_s
        self._clock = clock

    @property
    def lease_s(self) -> float:
        return self._lease_s

    def ensure_table(self) -> None:
        try:
            self._table.create_table()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc

    # --- reads -------------------------------------------------------------

    def epochs(self, account_id: str, folder_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Each folder's current epoch: what a row written outside the engine (a user action's) carries.

        ``folder_ids``: only those, one point read each when there are at most ``POINT_READS_UP_TO`` (a
        PATCH writes one folder; the whole partition holds every folder's row and the slots); more (a bulk
        action's rows span a dozen folders), or None: every folder, in one partition query. The point reads
        went one after another: 11 folders were 11 round trips, 0.35-0.7 s at load ~26, twice per bulk action.
        """
        if folder_ids is None or len(folder_ids) > POINT_READS_UP_TO:
            wanted = None if folder_ids is None else set(folder_ids)
            return {folder_id: row.epoch for folder_id, row in self.load(account_id).folders.items()
                    if wanted is None or folder_id in wanted}
        rows = {folder_id: self.get(account_id, folder_id) for folder_id in folder_ids}
        return {folder_id: row.epoch for folder_id, row in rows.items() if row is not None}

    def load(self, account_id: str) -> AccountSyncState:
        """All of an account's rows (one partition query)."""
        now = self._clock()
        folder_list: SyncState | None = None
        folders: dict[str, SyncState] = {}
        busy = 0
        slots: list[SlotRow] = []
        others: dict[str, Mapping[str, Any]] = {}
        for entity in self._query(account_id):
            key = entity["RowKey"]
            if key.startswith(SLOT_ROW_PREFIX):
                if entity.get("owner") and float(entity.get("until") or 0.0) > now:
                    busy += 1
                slot = slot_row_from_entity(entity)
                if slot is not None:
                    slots.append(slot)
            elif key == FOLDER_LIST_ROW:
                folder_list = from_entity(entity)
            elif key.startswith(FOLDER_ROW_PREFIX):
                state = from_entity(entity)
                if state.folder_id is not None:
                    folders[state.folder_id] = state
            else:
                others[key] = entity
        return AccountSyncState(account_id, folder_list, folders, busy, tuple(slots), others)

    def get(self, account_id: str, folder_id: str | None) -> SyncState | None:
        key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
        try:
            entity = self._call(self._table.get_entity, check_partition(account_id), key)
        except ResourceNotFoundError:
            return None
        return from_entity(entity)

    # --- plumbing ------------------------------------------------------------------

    def _transaction(self, operations: list[Any]) -> list[Mapping[str, Any]] | None:
        """Submit one entity-group transaction; None when the service refused it (a condition failed, a
        row exists or is gone: nothing was written). Other failures are ``DependencyUnavailable``."""
        try:
            return self._table.submit_transaction(operations)
        except TableTransactionError as exc:
            if exc.status_code in (404, 409, 412):
                return None
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except (ResourceNotFoundError, ResourceModifiedError, ResourceExistsError):
            return None
        except HttpResponseError as exc:
            if exc.status_code in (404, 409, 412):
                return None
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc

    def _query(self, account_id: str, prefix: str | None = None) -> Iterable[Any]:
        partition = check_partition(account_id)
        try:
            return self._table.query_partition(partition, row_prefix=prefix)
        except ResourceNotFoundError:
            return []
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc

    def _merge(self, state: SyncState, fields: Mapping[str, Any]) -> str:
        entity = to_entity_fields(fields)
        entity["PartitionKey"] = check_partition(state.account_id)
        entity["RowKey"] = state.row_key
        entity["updated_at"] = self._clock()
        meta = self._call(self._table.update_entity, entity, mode=UpdateMode.MERGE, etag=state.etag,
                          match_condition=MatchConditions.IfNotModified)
        return str(meta.get("etag"))

    def _merge_unconditional(self, account_id: str, row_key: str, fields: Mapping[str, Any]) -> bool:
        entity = to_entity_fields(fields)
        entity["PartitionKey"] = check_partition(account_id)
        entity["RowKey"] = row_key
        entity["updated_at"] = self._clock()
        try:
            self._call(self._table.update_entity, entity, mode=UpdateMode.MERGE)
        except ResourceNotFoundError:
            return False
        return True

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (ResourceNotFoundError, ResourceModifiedError, ResourceExistsError):
            raise
        except TableTransactionError as exc:
            if exc.status_code in (404, 409):
                raise   # a row of the batch exists, or is gone: the caller decides
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except HttpResponseError as exc:
            if exc.status_code == 412:
                raise ResourceModifiedError(message=str(exc), response=exc.response) from exc
            if exc.status_code == 409:
                raise ResourceExistsError(message=str(exc), response=exc.response) from exc
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc


def merge_if_unchanged(entity: dict[str, Any], etag: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A transaction's MERGE of ``entity``, only while the row still has ``etag``: a row written since makes
    the service refuse the whole transaction (412), which is how every batch here stays conditional."""
    return "update", entity, {"mode": UpdateMode.MERGE, "etag": etag, "match_condition": MatchConditions.IfNotModified}
