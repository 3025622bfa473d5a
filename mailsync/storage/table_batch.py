"""Entity-group transactions (Azure Tables' ``$batch``) written and read as text, not through MIME objects.

Why not ``TableClient.submit_transaction``: it builds every transaction as
``email`` MIME objects (a sub-request per operation, each run through a
pipeline of its own policies, then flattened by ``email.generator``) and
parses the answer with ``email.parser``. Profiled on the change path
(``bench/change_latency.py --in-process --cprofile``, 20 accounts, 200
changes, 2026-12-02): the two transactions of every notified round (slot +
lease, finish + slot) were **62 % of the sync worker's CPU**, and the
``email`` package alone (generator and parser) 9.3 of their 15.8 s, more
than the network, the HTTP client and the entity deserialiser together. The
``$batch`` format itself is a few lines of text (Microsoft, "Performing
entity group transactions"), so this module writes it and reads the answer
with one regular expression.

The request goes out through ``RestTable.submit_transaction``
(``mailsync.storage.rest.table``: one signed POST, with its retries and
timeouts). What stays the SDK's: the entity serialiser (the same ``@odata.type`` annotations, so a
row written here reads back exactly as one the SDK wrote), the If-Match
rules (a MERGE or DELETE without an ETag is ``If-Match: *``: the row must
exist; ``upsert`` sends none) and the exceptions: a refused operation raises
``TableTransactionError`` with the part's status and error code, as
``submit_transaction`` does, so callers keep their handling.
``tests/storage/test_table_batch.py`` holds it to the SDK's answers against
Azurite.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables._serialize import _add_entity_properties  # the SDK's own entity serialiser

API_VERSION = "2019-02-02"      # what azure-data-tables 12.7 sends
MAX_OPERATIONS = 100            # Azure Tables' limit per transaction

# One sub-response: its status line and its headers (the body, if any, follows the blank line).
_PART = re.compile(rb"HTTP/1\.1 (\d{3})[^\r\n]*\r\n(.*?)\r\n\r\n", re.DOTALL)
_ETAG = re.compile(rb"^etag:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def transaction_body(base_url: str, table_name: str, operations: Sequence[tuple[Any, ...]]) -> tuple[bytes, str]:
    """The ``$batch`` request for ``operations`` (``submit_transaction``'s tuples): its body and Content-Type.

    ``base_url`` is the service's (``https://<account>.table.core.windows.net``,
    or the emulator's with its account path): each sub-request names its row by URL.
    """
    if not operations:
        raise ValueError("a transaction needs at least one operation")
    if len(operations) > MAX_OPERATIONS:
        raise ValueError(f"at most {MAX_OPERATIONS} operations per transaction")
    changeset = f"changeset_{uuid.uuid4()}"
    batch = f"batch_{uuid.uuid4()}"
    parts: list[str] = []
    for index, operation in enumerate(operations):
        parts.append(f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                     f"Content-ID: {index}\r\n\r\n{_sub_request(base_url, table_name, operation)}\r\n")
    body = (f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
            + "".join(parts) + f"--{changeset}--\r\n\r\n--{batch}--\r\n").encode()
    return body, f"multipart/mixed; boundary={batch}"


def transaction_results(content: bytes, count: int, content_type: str) -> list[Mapping[str, Any]]:
    """Each operation's metadata (``{"etag": ...}``) from a 202 answer; ``TableTransactionError`` for a refusal.

    A refused transaction (nothing was written) raises ``TableTransactionError``
    with the failing part's ``status_code`` (404 gone, 409 exists, 412 changed,
    400 malformed) and ``error_code``, as the SDK's ``submit_transaction`` does.
    """
    return _results(content, count, content_type)


def _sub_request(base: str, table_name: str, operation: tuple[Any, ...]) -> str:
    kind = str(operation[0]).lower()
    entity: Mapping[str, Any] = operation[1]
    options: Mapping[str, Any] = operation[2] if len(operation) > 2 else {}
    key = (f"{base}/{table_name}(PartitionKey='{_key(entity['PartitionKey'])}',"
           f"RowKey='{_key(entity['RowKey'])}')")
    if kind == "create":
        return _http("POST", f"{base}/{table_name}", entity, None, prefer_no_content=True)
    if kind == "delete":
        return _http("DELETE", key, None, _if_match(options, required=True))
    if kind == "update":
        mode = options.get("mode", UpdateMode.MERGE)
        return _http("PATCH" if mode == UpdateMode.MERGE else "PUT", key, entity, _if_match(options, required=True))
    if kind == "upsert":
        mode = options.get("mode", UpdateMode.MERGE)
        return _http("PATCH" if mode == UpdateMode.MERGE else "PUT", key, entity, None)
    raise ValueError(f"unknown transaction operation {operation[0]!r}")


def _key(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("PartitionKey and RowKey must be strings")
    return quote(value.replace("'", "''"), safe="")


def _if_match(options: Mapping[str, Any], *, required: bool) -> str | None:
    """The If-Match header: the ETag under IfNotModified, else ``*`` (the row must exist) for update/delete."""
    etag = options.get("etag")
    if options.get("match_condition") == MatchConditions.IfNotModified:
        if not etag:
            raise ValueError("IfNotModified needs an etag")
        return etag if etag.startswith(("W/", '"')) else f'"{etag}"'
    return "*" if required else None


def _http(method: str, url: str, entity: Mapping[str, Any] | None, if_match: str | None, *,
          prefer_no_content: bool = False) -> str:
    lines = [f"{method} {url} HTTP/1.1", f"x-ms-version: {API_VERSION}", "DataServiceVersion: 3.0",
             "Accept: application/json;odata=minimalmetadata"]
    if if_match is not None:
        lines.append(f"If-Match: {if_match}")
    if prefer_no_content:
        lines.append("Prefer: return-no-content")
    payload = ""
    if entity is not None:
        payload = orjson.dumps(_add_entity_properties(entity)).decode()
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(payload.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + payload


def _results(content: bytes, count: int, content_type: str) -> list[Mapping[str, Any]]:
    """Each part's ETag; ``TableTransactionError`` for the first part the service refused.

    A refused transaction answers with one part (the failing operation's
    status, and an OData error whose message starts with its index).
    """
    if not _BOUNDARY.search(content_type):
        raise HttpResponseError(message="the transaction's answer is not multipart")
    found = list(_PART.finditer(content))
    for match in found:
        status = int(match.group(1))
        if not 200 <= status < 300:
            raise _refusal(status, content[match.end():])
    if len(found) != count:
        raise HttpResponseError(message=f"the transaction answered {len(found)} parts for {count} operations")
    results: list[Mapping[str, Any]] = []
    for match in found:
        etag = _ETAG.search(match.group(2))
        results.append({"etag": etag.group(1).decode().strip() if etag else None})
    return results


def _refusal(status: int, rest: bytes) -> TableTransactionError:
    body = rest.split(b"\r\n--", 1)[0].strip()
    code, message = "", f"the transaction was refused ({status})"
    try:
        error = orjson.loads(body).get("odata.error") or {}
        code = str(error.get("code") or "")
        text = error.get("message")
        message = str(text.get("value") if isinstance(text, dict) else text or message)
    except (orjson.JSONDecodeError, AttributeError):
        pass
    refused = TableTransactionError(message=message)
    refused.status_code = status
    refused.error_code = code or None   # type: ignore[attr-defined]
    refused.reason = None
    return refused
