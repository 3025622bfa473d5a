"""Fault injection at the transport edge, for the store contract tests.

A real cluster refuses individual bulk items with 429
``es_rejected_execution_exception`` when its write thread pool queue is
full; we cannot make osmem (or a healthy Elasticsearch) do that on
demand. :class:`FaultyTransport` stands exactly where the network is: it
sees the ``_bulk`` request the client is about to send, takes out the
items the plan says to refuse, sends the rest to the real server, and
splices item-level 429 answers (the shape Elasticsearch uses) back in at
the refused positions. The refused items are really not written, as on a
real cluster, so the test observes the store's retry through the real
server's state. Every bulk request is recorded (item ids per request).

A plan may also run a callback just before a request is forwarded (used
to race a write between the store's read and its conditional delete).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elastic_transport import ApiResponseMeta, HttpHeaders, TransportApiResponse

from mailsync.store.elasticsearch import PlainJsonTransport

REJECTED = {
    "type": "es_rejected_execution_exception",
    "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, "
              "replica_bytes=0, all_bytes=0, coordinating_operation_bytes=0, max_coordinating_and_primary_bytes=0]",
}


@dataclass
class FaultPlan:
    """What to refuse: doc id → how many more times to answer it with 429."""

    reject: dict[str, int] = field(default_factory=dict)
    before_bulk: Callable[[list[tuple[str, str]]], None] | None = None
    requests: list[list[tuple[str, str]]] = field(default_factory=list)   # (op, doc id) per bulk request

    def ids_of(self, request_no: int) -> list[str]:
        return [doc_id for _, doc_id in self.requests[request_no]]


def _split(lines: list[Any]) -> list[tuple[str, str, list[bytes]]]:
    """Bulk body lines → (op, doc id, raw lines) per item (the target index is the alias in the header)."""
    items = []
    raw = [line if isinstance(line, bytes | bytearray) else json.dumps(line).encode() for line in lines]
    i = 0
    while i < len(raw):
        header = json.loads(raw[i])
        op = next(iter(header))
        size = 1 if op == "delete" else 2
        items.append((op, str(header[op].get("_id")), raw[i:i + size]))
        i += size
    return items


def faulty_transport(plan: FaultPlan) -> type[PlainJsonTransport]:
    """A transport class bound to ``plan`` (pass it as ``transport_class``)."""

    class FaultyTransport(PlainJsonTransport):
        def perform_request(self, method: str, target: str, *, headers: Any = None, body: Any = None,
                            **kwargs: Any) -> TransportApiResponse:
            if not target.split("?")[0].endswith("/_bulk") or not isinstance(body, list | bytes | bytearray):
                return super().perform_request(method, target, headers=headers, body=body, **kwargs)
            if isinstance(body, bytes | bytearray):   # the store sends ready NDJSON
                body = [line for line in bytes(body).split(b"\n") if line]
            items = _split(body)
            plan.requests.append([(op, doc_id) for op, doc_id, _ in items])
            if plan.before_bulk is not None:
                callback, plan.before_bulk = plan.before_bulk, None
                callback([(op, doc_id) for op, doc_id, _ in items])
            refused = set()
            for index, (_, doc_id, _) in enumerate(items):
                if plan.reject.get(doc_id, 0) > 0:
                    plan.reject[doc_id] -= 1
                    refused.add(index)
            kept = [line for index, (_, _, lines) in enumerate(items) if index not in refused for line in lines]
            if kept:
                meta, answer = super().perform_request(method, target, headers=headers, body=kept, **kwargs)
                answered = iter(answer["items"])
            else:
                node = self.node_pool.get()
                meta = ApiResponseMeta(status=200, http_version="1.1", duration=0.0, node=node.config,
                                       headers=HttpHeaders({"content-type": "application/json",
                                                            "x-elastic-product": "Elasticsearch"}))
                answer, answered = {"took": 0}, iter(())
            merged = []
            for index, (op, doc_id, _) in enumerate(items):
                if index in refused:
                    merged.append({op: {"_index": "refused", "_id": doc_id, "status": 429, "error": dict(REJECTED)}})
                else:
                    merged.append(next(answered))
            body_out = dict(answer)
            body_out["items"] = merged
            body_out["errors"] = bool(refused) or bool(answer.get("errors"))
            return TransportApiResponse(meta, body_out)

    return FaultyTransport
