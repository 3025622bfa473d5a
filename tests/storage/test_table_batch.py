"""Entity-group transactions and partition queries without the SDK's MIME and deserialiser, against Azurite.

Held to the SDK: ``submit_transaction``'s rows written (types included, read
back through the SDK), ETags answered, and refusals (status, error code, the
failing operation's index) for the conditions the sync table relies on
(mailsync/storage/table_batch.py, sent by ``RestTable``); ``query_entities``'
rows, values and metadata for a partition (``RestTable.query_partition``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import EdmType, EntityProperty, TableClient, TableTransactionError, UpdateMode

from mailsync.settings import Settings
from mailsync.storage.connection import sdk_table_client, table_client
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_batch import MAX_OPERATIONS
from mailsync.storage.table_errors import ensure_table

Submit = Callable[[TableClient, Sequence[tuple[Any, ...]]], Sequence[Any]]


def _ours(settings: Settings) -> Submit:
    rest = table_client(settings, "batch")
    return lambda _sdk, ops: rest.submit_transaction(ops)


@pytest.fixture(params=["text", "sdk"])
def submit(request: pytest.FixtureRequest, storage_settings: Settings) -> Submit:
    """Ours (``RestTable.submit_transaction``) or the SDK's, on the same table as ``table``."""
    if request.param == "text":
        return _ours(storage_settings)
    return lambda sdk, ops: sdk.submit_transaction(ops)


@pytest.fixture
def table(storage_settings: Settings) -> TableClient:
    """The SDK's client: the rows are written and read back through it, to hold ours to its answers."""
    ensure_table(table_client(storage_settings, "batch"))
    return sdk_table_client(storage_settings, "batch")


@pytest.fixture
def rest(storage_settings: Settings) -> RestTable:
    client = table_client(storage_settings, "batch")
    ensure_table(client)
    return client


def _partition() -> str:
    return uuid.uuid4().hex


def _rows(table: TableClient, partition: str) -> dict[str, tuple[dict[str, Any], str]]:
    return {e["RowKey"]: (dict(e), e.metadata["etag"]) for e in
            table.query_entities("PartitionKey eq @p", parameters={"p": partition})}


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


def test_a_full_transaction_and_an_empty_one(table: TableClient, rest: RestTable) -> None:
    p = _partition()
    results = rest.submit_transaction([("create", {"PartitionKey": p, "RowKey": f"r{n:03}", "n": n})
                                       for n in range(MAX_OPERATIONS)])
    assert len(results) == MAX_OPERATIONS and all(r["etag"] for r in results)
    assert len(_rows(table, p)) == MAX_OPERATIONS
    assert rest.submit_transaction([]) == []
    with pytest.raises(ValueError):
        rest.submit_transaction([("create", {"PartitionKey": p, "RowKey": "x"})] * (MAX_OPERATIONS + 1))


# --- the partition query (RestTable.query_partition) -----------------------------------------------------------------

def test_a_partition_query_reads_what_the_sdks_query_reads(table: TableClient, rest: RestTable) -> None:
    p, other = _partition(), _partition()
    epoch = EntityProperty(1_800_000_000_123, EdmType.INT64)
    table.create_entity({"PartitionKey": p, "RowKey": "folders", "epoch": epoch,
                         "cursor": "https://x/?a='b'", "dirty": False, "until": 2.5, "whole": 3.0, "n": 7, "empty": ""})
    table.create_entity({"PartitionKey": p, "RowKey": "f:a'b", "name": "Inbox é"})
    for n in range(3):
        table.create_entity({"PartitionKey": p, "RowKey": f"slot:{n}", "owner": f"o{n}"})
    table.create_entity({"PartitionKey": other, "RowKey": "folders"})
    sdk = list(table.query_entities("PartitionKey eq @p", parameters={"p": p}))
    ours = rest.query_partition(p)
    assert [dict(e) for e in ours] == [dict(e) for e in sdk] and len(ours) == 5
    assert [e.metadata for e in ours] == [e.metadata for e in sdk]
    slots = rest.query_partition(p, row_prefix="slot:")
    assert [e["RowKey"] for e in slots] == ["slot:0", "slot:1", "slot:2"]
    assert rest.query_partition(_partition()) == []


def test_a_partition_query_follows_the_services_pages(rest: RestTable) -> None:
    p = _partition()
    for start in range(0, 1_100, MAX_OPERATIONS):          # the service answers at most 1,000 rows a page
        rest.submit_transaction([("create", {"PartitionKey": p, "RowKey": f"r{n:05}"})
                                 for n in range(start, min(start + MAX_OPERATIONS, 1_100))])
    assert [e["RowKey"] for e in rest.query_partition(p)] == [f"r{n:05}" for n in range(1_100)]


def test_a_partition_query_of_a_missing_table_is_not_found(storage_settings: Settings) -> None:
    with pytest.raises(ResourceNotFoundError):
        table_client(storage_settings, "nosuchtable").query_partition("p")
