"""Bulk writes to the search engine: chunking, concurrent requests, the 429 rule, per-item outcomes, dead letters.

Engine-neutral, like every store rule (the cluster is reached only through
:class:`~mailsync.store.engine.SearchEngine`). :class:`SearchStore
<mailsync.store.search_store.SearchStore>` decides *what* to write (versions,
conditions, epochs); this module decides *how* it travels and sorts what came
back:

* Bulk bodies are written directly: each action is encoded once with
  orjson into one NDJSON buffer per chunk (bounded by count and bytes) and
  sent with one ``_bulk`` request. (``helpers.streaming_bulk`` did the same
  with ~8-10 us of Python per document — action copying, re-chunking,
  per-item result dicts — measured by bench/pipeline.py; the chunking,
  retry and per-item rules below are the helper's, kept.)
* Up to ``bulk_writers`` chunks are in flight at once: a node indexes each
  request on one write thread per shard, so a second request keeps another
  core busy.
* Items refused with 429 (``es_rejected_execution_exception``), or a whole
  request answered 429, are retried, alone, with exponential back-off.
  What is still refused after that, item-level 5xx and a missing index are
  *transient*: :meth:`BulkWriter.finish` raises ``StoreUnavailable`` after
  the rest was written, so the caller re-applies the batch (idempotent).
* 409s are *conflicts*, whose meaning is the caller's (an older version
  refused, a conditional write that lost its race).
* Any other refused item (a mapping error, a poison document, an id the
  engine cannot take) is logged with its id and reason and written to the
  dead-letter index; it never fails the rest of the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from mailsync.errors import StoreError, StoreUnavailable
from mailsync.models import BulkResult
from mailsync.store import documents as docs
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engine_errors import error_parts, raise_store_error, short_reason, translating

log = logging.getLogger(__name__)

# Elasticsearch and OpenSearch refuse a document id over 512 bytes (UTF-8) -- and not just the
# item: the whole _bulk request fails validation (400 action_request_validation_exception), so one
# long IMAP folder name would poison every page it is in. Such items never leave the store.
MAX_ID_BYTES = 512


@dataclass(frozen=True)
class BulkLimits:
    """How bulk requests are cut and retried (from :class:`~mailsync.store.search_store.StoreOptions`)."""

    chunk_docs: int = 1_000
    chunk_bytes: int = 8 * 1024 * 1024
    bulk_writers: int = 2           # chunks of one call in flight at once
    max_retries: int = 5            # rounds of re-sending 429-refused items
    initial_backoff_s: float = 0.5  # doubled each round
    max_backoff_s: float = 30.0


# One bulk action: the header line's object (``{op: metadata}``) and the
# source line's (None for a delete), as the bulk API takes them.
BulkAction = tuple[dict[str, dict[str, Any]], dict[str, Any] | None]
# orjson appends the newline itself: concatenating b"\n" copied each ~1.5 KB line once more.
_NDJSON_LINE = orjson.OPT_APPEND_NEWLINE


@dataclass
class Tally:
    """What one bulk call did, item by item (the caller decides what conflicts mean)."""

    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)   # 409s (meaning depends on the caller)
    transient: list[str] = field(default_factory=list)   # still 429 after retries, 5xx, index gone
    dead: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        """Fold another call's outcome into this one."""
        self.written += other.written
        self.skipped += other.skipped
        self.failed += other.failed
        self.conflicts += other.conflicts
        self.transient += other.transient
        self.dead += other.dead

    def result(self) -> BulkResult:
        """What the port reports: written, skipped, failed ids."""
        return BulkResult(self.written, self.skipped, tuple(self.failed))


class BulkWriter:
    """Sends bulk actions for one store; thread-safe, one per :class:`SearchStore`."""

    def __init__(self, engine: SearchEngine, limits: BulkLimits, *, deadletter_index: str) -> None:
        self._engine = engine
        self.limits = limits
        self._deadletter_index = deadletter_index
        self._writers: ThreadPoolExecutor | None = None
        self._writers_lock = threading.Lock()

    def close(self) -> None:
        """Wait for the writer threads (if any were started) and stop them."""
        if self._writers is not None:
            self._writers.shutdown(wait=True)

    def send(self, actions: Iterable[BulkAction], *, target: str, what: str,
              originals: Mapping[str, dict[str, Any]] | None = None,
              max_retries: int | None = None) -> Tally:
        """Send ``actions`` in chunks and sort each item's outcome.

        ``originals`` maps doc ids to what was sent, for the dead letter.
        """
        tally = Tally()
        retries = self.limits.max_retries if max_retries is None else max_retries
        chunks = self.chunks(self._sendable(actions, tally, target=target, originals=originals))
        try:
            if self.limits.bulk_writers <= 1:
                for chunk in chunks:
                    self._send_chunk(chunk, tally, target=target, originals=originals, max_retries=retries)
            else:
                self._send_concurrently(chunks, tally, target=target, originals=originals, max_retries=retries)
        except EngineError as exc:
            raise_store_error(what, exc)
        return tally

    def _send_concurrently(self, chunks: Iterator[list[tuple[str, bytes]]], tally: Tally, *, target: str,
                           originals: Mapping[str, dict[str, Any]] | None, max_retries: int) -> None:
        """Up to ``bulk_writers`` chunks in flight; the next one is encoded while they are indexed.

        Each chunk sorts its items into a tally of its own, merged in order.
        Memory stays bounded: encoding waits for the oldest request once
        ``bulk_writers`` are in flight. The first error is raised after every
        request already sent has been answered (so the caller's retry of the
        whole batch never races one of ours).
        """
        pool = self._writer_pool()
        in_flight: list[tuple[Tally, Future[None]]] = []
        error: BaseException | None = None

        def settle(entry: tuple[Tally, Future[None]]) -> None:
            nonlocal error
            part, future = entry
            try:
                future.result()
            except BaseException as exc:   # re-raised below, once every request has come back
                error = error or exc
            tally.add(part)

        for chunk in chunks:
            if len(in_flight) >= self.limits.bulk_writers:
                settle(in_flight.pop(0))
            if error is not None:
                break
            part = Tally()
            in_flight.append((part, pool.submit(self._send_chunk, chunk, part, target=target, originals=originals,
                                                max_retries=max_retries)))
        for entry in in_flight:
            settle(entry)
        if error is not None:
            raise error

    def _writer_pool(self) -> ThreadPoolExecutor:
        with self._writers_lock:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(self.limits.bulk_writers, thread_name_prefix="store-bulk")
            return self._writers

    def _sendable(self, actions: Iterable[BulkAction], tally: Tally, *, target: str,
                  originals: Mapping[str, dict[str, Any]] | None) -> Iterator[BulkAction]:
        """The actions the engine can take; an id over MAX_ID_BYTES goes to the dead letter instead."""
        for header, source in actions:
            op, meta = next(iter(header.items()))
            doc_id = str(meta.get("_id", ""))
            if len(doc_id.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES:
                yield header, source
                continue
            self.dead(tally, doc_id=doc_id, routing=str(meta.get("routing") or ""), target=target, action=op,
                       status=400, error_type="id_too_long",
                       reason=f"document id of {len(doc_id.encode('utf-8', 'surrogatepass'))} bytes; "
                              f"the engine takes at most {MAX_ID_BYTES}",
                       document=(originals or {}).get(doc_id))

    def chunks(self, actions: Iterable[BulkAction]) -> Iterator[list[tuple[str, bytes]]]:
        """Encoded actions ``(op, header+source lines)``, grouped by ``chunk_docs`` and ``chunk_bytes``.

        An action larger than ``chunk_bytes`` goes alone (the cluster then
        decides), as the client's helper did.
        """
        limit_docs, limit_bytes = self.limits.chunk_docs, self.limits.chunk_bytes
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for header, source in actions:
            try:
                lines = orjson.dumps(header, option=_NDJSON_LINE)
                if source is not None:
                    lines += orjson.dumps(source, option=_NDJSON_LINE)
            except orjson.JSONEncodeError as exc:
                raise StoreError(f"cannot encode a bulk action: {exc}") from exc
            if chunk and (len(chunk) >= limit_docs or size + len(lines) > limit_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append((next(iter(header)), lines))
            size += len(lines)
        if chunk:
            yield chunk

    def _send_chunk(self, chunk: list[tuple[str, bytes]], tally: Tally, *, target: str,
                    originals: Mapping[str, dict[str, Any]] | None, max_retries: int) -> None:
        """One chunk, with the 429 rule: refused items (or a refused request) again, alone, with back-off."""
        for attempt in range(max_retries + 1):
            if attempt:
                time.sleep(min(self.limits.max_backoff_s, self.limits.initial_backoff_s * 2 ** (attempt - 1)))
            try:
                answer = self._engine.bulk(b"".join(lines for _, lines in chunk))
            except EngineError as exc:
                if attempt == max_retries or exc.status != 429:
                    raise
                continue
            items: list[dict[str, dict[str, Any]]] = answer.get("items") or []
            retry: list[tuple[str, bytes]] = []
            for (op, lines), answer in zip(chunk, items, strict=False):
                item = answer.get(op) or next(iter(answer.values()))
                status = int(item.get("status", 500))
                if status == 429 and attempt < max_retries:
                    retry.append((op, lines))
                else:
                    self._tally_item(tally, 200 <= status < 300, op, item, target, originals)
            if len(items) < len(chunk):   # an answer short of items: let the caller re-apply the batch
                tally.transient += [_doc_id_of(lines) for _, lines in chunk[len(items):]]
            if not retry:
                return
            chunk = retry

    def _tally_item(self, tally: Tally, ok: bool, op: str, item: Mapping[str, Any], target: str,
                    originals: Mapping[str, dict[str, Any]] | None) -> None:
        doc_id = str(item.get("_id", ""))
        status = int(item.get("status", 500))
        if ok:
            if item.get("result") == "noop":
                tally.skipped += 1
            else:
                tally.written += 1
            return
        error_type, reason = error_parts(item)
        if status == 409:
            tally.conflicts.append(doc_id)
        elif status == 404 and ((op == "delete" and error_type == "not_found")
                                or (op == "update" and error_type == "document_missing_exception")):
            tally.skipped += 1   # already gone
        elif status == 429 or status >= 500 or error_type == "index_not_found_exception":
            tally.transient.append(doc_id)
            log.warning("store write refused for now", extra={
                "doc_id": doc_id, "status": status, "error_type": error_type, "reason": short_reason(reason)})
        else:
            self.dead(tally, doc_id=doc_id, routing=str(item.get("_routing") or ""), target=target, action=op,
                       status=status, error_type=error_type, reason=reason,
                       document=(originals or {}).get(doc_id))

    def dead(self, tally: Tally, *, doc_id: str, routing: str, target: str, action: str, status: int,
              error_type: str, reason: str, document: dict[str, Any] | None) -> None:
        """Count ``doc_id`` as failed for good; its letter is written by :meth:`finish`."""
        account_id = routing or (str(document.get("account_id", "")) if document else "") \
            or doc_id.partition(":")[0]
        log.error("store write refused; kept in the dead-letter index", extra={
            "doc_id": doc_id, "target": target, "status": status, "error_type": error_type,
            "reason": short_reason(reason)})
        tally.failed.append(doc_id)
        tally.dead.append({
            "account_id": account_id or "_unknown",
            "doc_id": doc_id,
            "target": target,
            "action": action,
            "status": status,
            "error_type": error_type,
            "reason": reason[:10_000],
            "recorded_at": docs.now_iso(),
            "document": document,
        })

    def _flush_dead(self, tally: Tally) -> None:
        """Write the dead letters; if even that fails, the error log above is the record."""
        if not tally.dead:
            return
        actions: list[BulkAction] = [({"index": {
            "_index": self._deadletter_index,
            "_id": _dead_letter_id(letter["target"], letter["doc_id"]),
            "routing": letter["account_id"],
        }}, letter) for letter in tally.dead]
        try:
            written = self.send(actions, target="deadletter", what="dead letters", max_retries=2)
        except StoreError as exc:
            log.error("could not write dead letters", extra={"count": len(actions), "error": type(exc).__name__})
        else:
            # A dead letter refused in turn is not dead-lettered again: the error log is its record.
            for doc_id in written.conflicts + written.transient + written.failed:
                log.error("could not write a dead letter", extra={"doc_id": doc_id})
            # Dead letters are rare and read by people right after the failure they explain
            # (dead_letters() searches): make them searchable now, not at the next refresh.
            with contextlib.suppress(StoreError), translating("dead letters"):
                self._engine.refresh([self._deadletter_index])
        tally.dead = []

    def finish(self, tally: Tally, what: str) -> BulkResult:
        """Write the dead letters, then raise ``StoreUnavailable`` if anything is to be re-applied, or report."""
        self._flush_dead(tally)
        if tally.transient:
            raise StoreUnavailable(
                f"{what}: {len(tally.transient)} item(s) refused by an overloaded or missing index "
                f"(first: {tally.transient[0]}); the rest was applied, re-apply the batch",
                retry_after_s=5.0,
            )
        return tally.result()


def _dead_letter_id(target: str, doc_id: str) -> str:
    """``<target>:<doc id>``, or a digest of it when that would be too long for an id (an id_too_long letter)."""
    letter_id = f"{target}:{doc_id}"
    if len(letter_id.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES:
        return letter_id
    return f"{target}:sha256:{hashlib.sha256(doc_id.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _doc_id_of(lines: bytes) -> str:
    """The ``_id`` in an encoded action's header line (only for the rare short-answer report)."""
    header: dict[str, dict[str, Any]] = orjson.loads(lines.split(b"\n", 1)[0])
    return str(next(iter(header.values())).get("_id", ""))
