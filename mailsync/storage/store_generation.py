"""The store generation the poll scheduler last saw: one row beside the sync cursors.

Table ``<prefix>sync``, ``PartitionKey = "~store"``, ``RowKey =
"generation"``. ``~`` never starts an account id (they are hex), so no
account's partition query ever returns this row.
"""

from __future__ import annotations

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import table_errors

PARTITION = "~store"
ROW = "generation"


class TableGenerationLedger:
    """``GenerationLedger`` in Azure Tables."""

    def __init__(self, table: RestTable) -> None:
        self._table = table

    def seen(self) -> str:
        """The generation recorded last; "" before the first record."""
        try:
            with table_errors("reading the store generation seen"):
                entity = self._table.get_entity(PARTITION, ROW)
        except ResourceNotFoundError:
            return ""
        return str(entity.get("generation") or "")

    def record(self, generation: str) -> None:
        with table_errors("recording the store generation"):
            self._table.upsert_entity({"PartitionKey": PARTITION, "RowKey": ROW, "generation": generation},
                                      mode=UpdateMode.REPLACE)
