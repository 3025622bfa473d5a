"""A query of one partition's rows, read with one JSON parse instead of the SDK's generic deserialiser.

Why: every folder round starts from its account's rows (one partition query:
the folder list, each folder, the slots, the pending notifications). Through
``TableClient.query_entities`` the answer goes through the generated
``Deserializer`` (every property of every row: a type lookup, an ``eval``
of its type name, then the model) before the entity conversion; a 13-folder
partition is ~450 properties. Profiled on the change path (2026-12-02,
``bench/change_latency.py --in-process --cprofile``) the partition reads were
a fifth of the sync worker's CPU once its transactions were cut
(``mailsync.storage.table_batch``), the deserialiser first among them.

Here the answer is parsed once (orjson) and each row converted by the SDK's
own entity conversion (``_convert_to_entity``: the same values, ETag and
metadata as ``query_entities`` gives), through the ``TableClient``'s own
pipeline (authentication, retries, transport). Pages follow the service's
continuation headers, as the SDK's pager does. Errors are the pipeline's
(``HttpResponseError`` with the status; 404 when the table is missing).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.data.tables import TableClient, TableEntity
from azure.data.tables._deserialize import _convert_to_entity  # the SDK's own entity conversion

from mailsync.storage.table_batch import API_VERSION

_NEXT_PARTITION = "x-ms-continuation-NextPartitionKey"
_NEXT_ROW = "x-ms-continuation-NextRowKey"


def query_partition(table: TableClient, partition_key: str, *, row_prefix: str | None = None) -> list[TableEntity]:
    """Every row of ``partition_key`` (those whose RowKey starts with ``row_prefix``, if given), in key order."""
    condition = f"PartitionKey eq {_literal(partition_key)}"
    if row_prefix:
        upper = row_prefix[:-1] + chr(ord(row_prefix[-1]) + 1)
        condition += f" and RowKey ge {_literal(row_prefix)} and RowKey lt {_literal(upper)}"
    base = f"{table.scheme}://{table._primary_hostname}/{quote(table.table_name)}()"   # the SDK's batch uses it too
    query = "$filter=" + quote(condition, safe="")
    headers = {"x-ms-version": API_VERSION, "DataServiceVersion": "3.0",
               "Accept": "application/json;odata=minimalmetadata"}
    entities: list[TableEntity] = []
    continuation = ""
    while True:
        request = HttpRequest("GET", f"{base}?{query}{continuation}", headers=headers)
        # stream=True: the pipeline's content decoder would parse the JSON with the stdlib first.
        response = table._client._client.send_request(request, stream=True)   # the TableClient's pipeline
        content = response.read()
        if response.status_code == 404:
            raise ResourceNotFoundError(message="the table does not exist", response=response)
        if response.status_code != 200:
            raise HttpResponseError(message=f"the query was refused: {response.status_code}", response=response)
        entities.extend(_convert_to_entity(row) for row in _rows(content))   # type: ignore[no-untyped-call]
        next_partition = response.headers.get(_NEXT_PARTITION)
        if not next_partition:
            return entities
        continuation = f"&NextPartitionKey={quote(next_partition, safe='')}"
        next_row = response.headers.get(_NEXT_ROW)
        if next_row:
            continuation += f"&NextRowKey={quote(next_row, safe='')}"


def _literal(value: str) -> str:
    """An OData string literal (a quote doubled, as the SDK's parameter substitution does)."""
    return "'" + value.replace("'", "''") + "'"


def _rows(content: bytes) -> list[dict[str, Any]]:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise HttpResponseError(message="the query's answer is not JSON") from exc
    rows = body.get("value") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise HttpResponseError(message="the query's answer holds no rows")
    return rows
