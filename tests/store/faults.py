"""Fault injection at the engine seam, for the store contract tests.

A real cluster refuses individual bulk items with 429
``es_rejected_execution_exception`` when its write thread pool queue is
full; we cannot make a healthy node do that on demand.
:class:`FaultyEngine` stands between the store and its engine client (the
last step before the network, the same for every engine): it sees the
``_bulk`` body the store is about to send, takes out the items the plan
says to refuse, sends the rest to the real server, and splices item-level
429 answers (the shape Elasticsearch and OpenSearch use) back in at the
refused positions. The refused items are really not written, as on a
loaded cluster, so the test observes the store's retry through the real
server's state. Every bulk request is recorded (item ids per request).

A plan may also run a callback just before a request is forwarded (used
to race a write between the store's read and its conditional delete).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailsync.store.engine import SearchEngine

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


def _split(body: bytes) -> list[tuple[str, str, list[bytes]]]:
    """A bulk NDJSON body → (op, doc id, raw lines) per item."""
    raw = [line for line in body.split(b"\n") if line]
    items = []
    i = 0
    while i < len(raw):
        header = json.loads(raw[i])
        op = next(iter(header))
        size = 1 if op == "delete" else 2
        items.append((op, str(header[op].get("_id")), raw[i:i + size]))
        i += size
    return items


class FaultyEngine:
    """A SearchEngine that refuses the bulk items ``plan`` names and records every bulk request."""

    def __init__(self, inner: SearchEngine, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan
        self.name = inner.name

    def __getattr__(self, attr: str) -> Any:   # every other call goes to the real engine
        return getattr(self._inner, attr)

    def bulk(self, body: bytes) -> dict[str, Any]:
        plan = self._plan
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
        answer: dict[str, Any] = {"took": 0, "errors": False, "items": []}
        if kept:
            answer = self._inner.bulk(b"\n".join(kept) + b"\n")
        answered = iter(answer["items"])
        merged = []
        for index, (op, doc_id, _) in enumerate(items):
            if index in refused:
                merged.append({op: {"_index": "refused", "_id": doc_id, "status": 429, "error": dict(REJECTED)}})
            else:
                merged.append(next(answered))
        return {**answer, "items": merged, "errors": bool(refused) or bool(answer.get("errors"))}


def faulty(plan: FaultPlan) -> Callable[[SearchEngine], SearchEngine]:
    """``make_store(wrap=faulty(plan))``: the store's engine behind a :class:`FaultyEngine`."""
    def wrap(engine: SearchEngine) -> SearchEngine:
        return FaultyEngine(engine, plan)   # type: ignore[return-value]   # the rest by delegation
    return wrap
