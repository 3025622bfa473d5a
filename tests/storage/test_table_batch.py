"""Entity-group transactions written as text (mailsync/storage/table_batch.py) against Azurite.

Held to the SDK's ``submit_transaction``: the same rows written (types
included, read back through the SDK), the same ETags answered, and the same
refusals (status, error code, the failing operation's index) for the
conditions the sync table relies on.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.data.tables import TableClient, TableTransactionError, UpdateMode

from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from mailsync.storage.table_batch import MAX_OPERATIONS, submit_transaction
from mailsync.storage.table_errors import ensure_table

Submit = Callable[[TableClient, Sequence[tuple[Any, ...]]], Sequence[Any]]
BOTH: list[Submit] = [submit_transaction, lambda table, ops: table.submit_transaction(ops)]


@pytest.fixture
def table(storage_settings: Settings) -> TableClient:
    client = table_client(storage_settings, "batch")
    ensure_table(client)
    return client


def _partition() -> str:
    return uuid.uuid4().hex


def _rows(table: TableClient, partition: str) -> dict[str, tuple[dict[str, Any], str]]:
    return {e["RowKey"]: (dict(e), e.metadata["etag"]) for e in
            table.query_entities("PartitionKey eq @p", parameters={"p": partition})}


@pytest.mark.parametrize("submit", BOTH, ids=["text", "sdk"])
def test_create_merge_upsert_delete_write_what_the_sdk_writes(table: TableClient, submit: Submit) -> None:
    p = _partition()
    first = table.create_entity({"PartitionKey": p, "RowKey": "f:a'b", "dirty": True, "epoch": 3})
    gone = table.create_entity({"PartitionKey": p, "RowKey": "old"})
    results = submit(table, [
        ("create", {"PartitionKey": p, "RowKey": "slot:0", "owner": "o#1", "until": 5.0, "n": 7, "s": "é \"q\""}),
        ("update", {"PartitionKey": p, "RowKey": "f:a'b", "dirty": False, "until": 1.5},
         {"mode": UpdateMode.MERGE, "etag": first["etag"], "match_condition": MatchConditions.IfNotModified}),
        ("upsert", {"PartitionKey": p, "RowKey": "pending", "x": ""}, {"mode": UpdateMode.MERGE}),
        ("delete", {"PartitionKey": p, "RowKey": "old"},
         {"etag": gone["etag"], "match_condition": MatchConditions.IfNotModified}),
    ])
    rows = _rows(table, p)
    assert set(rows) == {"slot:0", "f:a'b", "pending"}
    slot, merged = rows["slot:0"][0], rows["f:a'b"][0]
    assert slot == {"PartitionKey": p, "RowKey": "slot:0", "owner": "o#1", "until": 5.0, "n": 7, "s": "é \"q\""}
    assert isinstance(slot["until"], float) and isinstance(slot["n"], int)
    assert merged == {"PartitionKey": p, "RowKey": "f:a'b", "dirty": False, "epoch": 3, "until": 1.5}
    # Each operation's ETag is the row's as it now reads (the engine takes its next write from it).
    assert [r["etag"] for r in results[:3]] == [rows["slot:0"][1], rows["f:a'b"][1], rows["pending"][1]]


@pytest.mark.parametrize("submit", BOTH, ids=["text", "sdk"])
def test_a_refused_transaction_writes_nothing_and_names_the_failing_operation(table: TableClient,
                                                                             submit: Submit) -> None:
    p = _partition()
    row = table.create_entity({"PartitionKey": p, "RowKey": "a", "v": 1})
    table.update_entity({"PartitionKey": p, "RowKey": "a", "v": 2})        # the ETag we hold is stale now
    cases: list[tuple[list[tuple[Any, ...]], int, str, int]] = [
        ([("create", {"PartitionKey": p, "RowKey": "b"}),
          ("update", {"PartitionKey": p, "RowKey": "a", "v": 3},
           {"mode": UpdateMode.MERGE, "etag": row["etag"], "match_condition": MatchConditions.IfNotModified})],
         412, "UpdateConditionNotSatisfied", 1),
        ([("create", {"PartitionKey": p, "RowKey": "b"}), ("create", {"PartitionKey": p, "RowKey": "a"})],
         409, "EntityAlreadyExists", 1),
        # A merge or delete without an ETag still needs the row (If-Match: *), as the SDK's.
        ([("create", {"PartitionKey": p, "RowKey": "b"}),
          ("update", {"PartitionKey": p, "RowKey": "gone", "v": 1}, {"mode": UpdateMode.MERGE})],
         404, "ResourceNotFound", 1),
        ([("delete", {"PartitionKey": p, "RowKey": "gone"})], 404, "ResourceNotFound", 0),
    ]
    for operations, status, code, index in cases:
        with pytest.raises(TableTransactionError) as refused:
            submit(table, operations)
        assert (refused.value.status_code, refused.value.error_code, refused.value.index) == (status, code, index)
    assert set(_rows(table, p)) == {"a"}
    assert _rows(table, p)["a"][0]["v"] == 2


def test_a_full_transaction_and_an_empty_one(table: TableClient) -> None:
    p = _partition()
    results = submit_transaction(table, [("create", {"PartitionKey": p, "RowKey": f"r{n:03}", "n": n})
                                         for n in range(MAX_OPERATIONS)])
    assert len(results) == MAX_OPERATIONS and all(r["etag"] for r in results)
    assert len(_rows(table, p)) == MAX_OPERATIONS
    assert submit_transaction(table, []) == []
    with pytest.raises(ValueError):
        submit_transaction(table, [("create", {"PartitionKey": p, "RowKey": "x"})] * (MAX_OPERATIONS + 1))
