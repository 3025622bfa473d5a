"""``RestTable`` (mailsync/storage/rest/table.py) held to the SDK's ``TableClient`` against Azurite.

Each call the adapters make, made both ways on the same table: the rows
written (read back through the SDK, types included), the values and
metadata read, and the exceptions (class, status, error code) of the
refusals the adapters handle.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import EdmType, EntityProperty, TableClient, UpdateMode

from mailsync.settings import Settings
from mailsync.storage.connection import sdk_table_client, table_client
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import ensure_table


@pytest.fixture
def rest(storage_settings: Settings) -> RestTable:
    client = table_client(storage_settings, "rest")
    ensure_table(client)
    return client


@pytest.fixture
def sdk(storage_settings: Settings, rest: RestTable) -> TableClient:
    return sdk_table_client(storage_settings, "rest")


def _p() -> str:
    return uuid.uuid4().hex


ROW: dict[str, Any] = {"s": "é \"q\" 'x'", "n": 7, "big": EntityProperty(1_800_000_000_123, EdmType.INT64),
                       "f": 2.5, "whole": 3.0, "b": True, "empty": "", "bytes": b"\x00\xff",
                       "when": datetime(2026, 12, 2, 7, 0, 1, 500000, tzinfo=UTC),
                       "guid": uuid.UUID("c9da6455-213d-42c9-9a79-3e9149a57833")}


def test_rows_written_by_either_read_the_same_through_either(rest: RestTable, sdk: TableClient) -> None:
    p = _p()
    ours = rest.create_entity({"PartitionKey": p, "RowKey": "ours", **ROW})
    theirs = sdk.create_entity({"PartitionKey": p, "RowKey": "theirs", **ROW})
    for key, meta in (("ours", ours), ("theirs", theirs)):
        a, b = rest.get_entity(p, key), sdk.get_entity(p, key)
        assert dict(a) == dict(b) and a.metadata == b.metadata
        assert a.metadata["etag"] == meta["etag"]
        assert {k: v for k, v in a.items() if k not in ("PartitionKey", "RowKey")} == \
            {k: v for k, v in sdk.get_entity(p, "theirs").items() if k not in ("PartitionKey", "RowKey")}
    assert set(ours) == set(theirs)   # date, etag, version
    selected = rest.get_entity(p, "ours", select=["n"])
    assert dict(selected) == dict(sdk.get_entity(p, "ours", select=["n"]))


def test_merge_replace_upsert_and_their_conditions(rest: RestTable, sdk: TableClient) -> None:
    p = _p()
    first = rest.create_entity({"PartitionKey": p, "RowKey": "a", "x": 1, "y": 1})
    merged = rest.update_entity({"PartitionKey": p, "RowKey": "a", "y": 2}, mode=UpdateMode.MERGE,
                                etag=first["etag"], match_condition=MatchConditions.IfNotModified)
    assert dict(sdk.get_entity(p, "a")) == {"PartitionKey": p, "RowKey": "a", "x": 1, "y": 2}
    assert sdk.get_entity(p, "a").metadata["etag"] == merged["etag"]
    rest.update_entity({"PartitionKey": p, "RowKey": "a", "z": 3}, mode=UpdateMode.REPLACE)
    assert dict(sdk.get_entity(p, "a")) == {"PartitionKey": p, "RowKey": "a", "z": 3}
    rest.upsert_entity({"PartitionKey": p, "RowKey": "new", "v": 1})
    rest.upsert_entity({"PartitionKey": p, "RowKey": "new", "w": 2})
    assert dict(sdk.get_entity(p, "new")) == {"PartitionKey": p, "RowKey": "new", "v": 1, "w": 2}
    for client in (rest, sdk):
        with pytest.raises(ResourceModifiedError) as stale:   # the ETag we hold is old
            client.update_entity({"PartitionKey": p, "RowKey": "a", "v": 9}, etag=first["etag"],
                                 match_condition=MatchConditions.IfNotModified)
        assert (stale.value.status_code, stale.value.error_code) == (412, "UpdateConditionNotSatisfied")
        with pytest.raises(ResourceNotFoundError) as gone:     # no ETag: If-Match *, the row must exist
            client.update_entity({"PartitionKey": p, "RowKey": "missing", "v": 9})
        assert (gone.value.status_code, gone.value.error_code) == (404, "ResourceNotFound")
        with pytest.raises(ResourceExistsError) as taken:
            client.create_entity({"PartitionKey": p, "RowKey": "a"})
        assert taken.value.status_code == 409   # (the SDK's insert sets no error_code)
        with pytest.raises(ResourceNotFoundError):
            client.get_entity(p, "missing")


def test_deletes_as_the_sdk_deletes(rest: RestTable, sdk: TableClient) -> None:
    p = _p()
    row = rest.create_entity({"PartitionKey": p, "RowKey": "a"})
    rest.update_entity({"PartitionKey": p, "RowKey": "a", "v": 1})
    for client in (rest, sdk):
        client.delete_entity(p, "missing")      # a missing row is no error
        with pytest.raises(ResourceModifiedError):
            client.delete_entity(p, "a", etag=row["etag"], match_condition=MatchConditions.IfNotModified)
    current = rest.get_entity(p, "a")
    rest.delete_entity(current, match_condition=MatchConditions.IfNotModified)   # the entity's own ETag
    with pytest.raises(ResourceNotFoundError):
        sdk.get_entity(p, "a")
    rest.create_entity({"PartitionKey": p, "RowKey": "b"})
    rest.delete_entity({"PartitionKey": p, "RowKey": "b"})
    assert list(sdk.query_entities("PartitionKey eq @p", parameters={"p": p})) == []
    # missing_ok=False: a delete that must be the one that removed the row says when it was gone already.
    row = rest.create_entity({"PartitionKey": p, "RowKey": "c"})
    rest.delete_entity(p, "c", etag=row["etag"], match_condition=MatchConditions.IfNotModified, missing_ok=False)
    for etag in (row["etag"], None):
        with pytest.raises(ResourceNotFoundError):
            rest.delete_entity(p, "c", etag=etag, match_condition=MatchConditions.IfNotModified if etag else None,
                               missing_ok=False)


def test_queries_with_parameters_select_and_pages(rest: RestTable, sdk: TableClient) -> None:
    p = _p()
    rest.submit_transaction([("create", {"PartitionKey": p, "RowKey": f"r{n:04}", "n": n, "odd": n % 2 == 1,
                                         "name": "o'brien" if n == 3 else f"n{n}"}) for n in range(40)])
    for query, params in (("PartitionKey eq @p and odd eq @o", {"p": p, "o": True}),
                          ("PartitionKey eq @p and n ge @n", {"p": p, "n": 35}),
                          ("PartitionKey eq @p and name eq @name", {"p": p, "name": "o'brien"})):
        ours = list(rest.query_entities(query, parameters=params, select=["RowKey", "n"], results_per_page=7))
        theirs = list(sdk.query_entities(query, parameters=params, select=["RowKey", "n"], results_per_page=7))
        assert [dict(e) for e in ours] == [dict(e) for e in theirs] and ours
        assert [e.metadata for e in ours] == [e.metadata for e in theirs]
    everything = [e["RowKey"] for e in rest.list_entities(results_per_page=15) if e["PartitionKey"] == p]
    assert everything == [f"r{n:04}" for n in range(40)]


def test_tables_are_created_once_and_deleted_quietly(storage_settings: Settings) -> None:
    name = f"t{uuid.uuid4().hex[:12]}"
    rest = table_client(storage_settings, name)
    with pytest.raises(ResourceNotFoundError):
        rest.get_entity("p", "r")
    rest.create_table()
    with pytest.raises(ResourceExistsError):
        rest.create_table()
    rest.delete_table()
    rest.delete_table()             # gone already: no error, as the SDK's
    with pytest.raises(TypeError):
        rest.get_entity(1, "r")     # type: ignore[arg-type]


@pytest.mark.parametrize("timestamp", ["2026-12-02T07:23:50.8203142Z", "2026-12-02T07:23:50.82Z",
                                       "2026-12-02T07:23:50Z", "2026-12-02T07:23:50.1234567890Z"])
def test_a_rows_conversion_is_the_sdks(timestamp: str) -> None:
    from azure.data.tables._deserialize import _convert_to_entity

    from mailsync.storage.rest.table import to_entity

    row = {"odata.etag": "W/\"datetime'x'\"", "odata.metadata": "http://x/$metadata", "odata.id": "id",
           "PartitionKey": "p", "RowKey": "r", "Timestamp": timestamp, "s": "text", "n": 7, "b": False, "f": 2.5,
           "big": 2**40, "neg": -(2**31) - 1, "i64@odata.type": "Edm.Int64", "i64": "1800000000123",
           "when@odata.type": "Edm.DateTime", "when": "2026-01-02T03:04:05.5Z",
           "g@odata.type": "Edm.Guid", "g": "c9da6455-213d-42c9-9a79-3e9149a57833",
           "bin@odata.type": "Edm.Binary", "bin": "AP8=", "d@odata.type": "Edm.Double", "d": "NaN"}
    ours, theirs = to_entity(row), _convert_to_entity(row)
    assert set(ours) == set(theirs)
    for key in ours:   # NaN is not equal to itself: compare its text
        assert repr(ours[key]) == repr(theirs[key]), key
    assert ours.metadata == theirs.metadata
    assert ours.metadata["timestamp"].tables_service_value == theirs.metadata["timestamp"].tables_service_value
    without = {k: v for k, v in row.items() if k != "odata.etag"}   # the ETag then comes from the Timestamp
    assert to_entity(without).metadata == _convert_to_entity(without).metadata
