"""The store's reads: pages of messages, one message, a mailbox, folders with counts, dead letters.

Every read takes an ``account_id``, uses it as routing *and* adds a term
filter on it (routing alone only picks a shard, which other accounts
share). ``get_message`` checks the stored ``account_id`` as well. A page
of messages is sorted newest first with a tie-breaker on the id; its
cursor is the last hit's sort values, opaque to the caller and checked
here, so a forged one is the caller's 400 and never a store failure.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailsync.errors import InputError, StoreError, StoreUnavailable
from mailsync.models import FolderView, Mailbox, Message, MessagePage, MessageQuery
from mailsync.store import documents as docs
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engine_errors import translating
from mailsync.store.mappings import IndexNames

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500
MAX_QUERY_CHARS = 1_000
MAX_FOLDERS = 10_000
# A search that reaches an index whose primary shard has not started yet (it was just created, by the
# poll tick's resync of a lost store or by another worker) is answered 503 "all shards failed": the
# index is in the cluster state before its shard is allocated. The shard starts within a moment, so a
# read waits that long rather than answer the page "try again"; a shard still down after it is an outage.
SHARD_START_WAITS_S = (0.1, 0.2, 0.4, 0.8)
_TEXT_FIELDS = ["subject", "from.name", "from.address.text", "body_preview", "body_text"]


@dataclass(frozen=True)
class DeadLetter:
    """A write the cluster refused for good, as kept in the dead-letter index."""

    doc_id: str
    account_id: str
    target: str
    action: str
    status: int
    error_type: str
    reason: str
    recorded_at: datetime | None
    document: dict[str, Any] | None


def encode_cursor(sort_values: Sequence[Any]) -> str:
    """An opaque page cursor from a hit's sort values."""
    raw = json.dumps({"v": 1, "after": list(sort_values)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CURSOR_ERROR = "cursor is not a page cursor of this list; start again without it"
_LONG = (-(2**63), 2**63 - 1)   # sort_ts is a long: search_after outside it fails inside the store
_MAX_CURSOR_ID = 1024


def decode_cursor(cursor: str) -> list[Any]:
    """The sort values inside a cursor made by :func:`encode_cursor`; InputError naming ``cursor`` if it is not one.

    Everything the store would choke on is refused here, so a forged cursor
    is the caller's 400 and never a store failure (a 500 that once carried
    the store's whole query).
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = data["after"]
        if (data.get("v") != 1 or not isinstance(after, list) or len(after) != 2
                or not isinstance(after[0], int) or isinstance(after[0], bool) or not isinstance(after[1], str)
                or not _LONG[0] <= after[0] <= _LONG[1] or not 0 < len(after[1]) <= _MAX_CURSOR_ID):
            raise ValueError("unexpected cursor content")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(CURSOR_ERROR, code="invalid_cursor") from exc
    return after


class StoreReads:
    """The read half of :class:`~mailsync.store.search_store.SearchStore`, which delegates to it."""

    def __init__(self, engine: SearchEngine, names: IndexNames, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._engine = engine
        self.names = names
        self._sleep = sleep

    def list_messages(self, account_id: str, query: MessageQuery) -> MessagePage:
        """One page of the account's messages, newest first, with the next page's cursor."""
        docs.check_account_id(account_id)
        if not 1 <= query.limit <= MAX_PAGE_SIZE:
            raise InputError(f"limit must be 1..{MAX_PAGE_SIZE}", code="invalid_limit")
        filters: list[dict[str, Any]] = [{"term": {"account_id": account_id}}]
        must_not: list[dict[str, Any]] = []
        if query.folder_id is not None:
            filters.append({"term": {"folder_id": query.folder_id}})
        if query.unread is not None:
            filters.append({"term": {"is_read": not query.unread}})
        if query.flagged is True:
            filters.append({"term": {"flag_status": "flagged"}})
        elif query.flagged is False:
            must_not.append({"term": {"flag_status": "flagged"}})
        bool_query: dict[str, Any] = {"filter": filters}
        if must_not:
            bool_query["must_not"] = must_not
        if query.q is not None and query.q.strip():
            if len(query.q) > MAX_QUERY_CHARS:
                raise InputError(f"q is longer than {MAX_QUERY_CHARS} characters", code="invalid_query")
            bool_query["must"] = [{"simple_query_string": {
                "query": query.q, "fields": _TEXT_FIELDS, "default_operator": "and", "lenient": True}}]
        search: dict[str, Any] = {
            "query": {"bool": bool_query},
            "sort": [{"sort_ts": {"order": "desc"}}, {"message_id": {"order": "desc"}}],
            "size": query.limit + 1,   # one extra tells whether a next page exists
            "_source": {"excludes": list(docs.LIST_EXCLUDES)},
            "track_total_hits": False,
        }
        if query.cursor:
            search["search_after"] = decode_cursor(query.cursor)
        try:
            hits = self._search(self.names.messages, account_id, search, "list_messages")
        except StoreError as exc:
            if query.cursor is None or isinstance(exc, StoreUnavailable):
                raise
            # The store refused the query and the only thing in it the caller shaped is the cursor:
            # their 400, not our 500 (and never the store's words: they quote the query).
            log.info("the store refused a page cursor: %s", exc.message)
            raise InputError(CURSOR_ERROR, code="invalid_cursor") from exc
        page = hits[: query.limit]
        messages = tuple(docs.message_from_document(h["_source"]) for h in page
                         if h.get("_source", {}).get("account_id") == account_id)
        next_cursor = encode_cursor(page[-1]["sort"]) if len(hits) > query.limit else None
        return MessagePage(messages=messages, next_cursor=next_cursor)

    def get_messages(self, account_id: str, message_ids: Sequence[str]) -> dict[str, Message]:
        """The account's messages among ``message_ids`` (whole, as ``get_message``), by id; one multi-get
        per 1,000 instead of a read each (a bulk action names up to 500)."""
        docs.check_account_id(account_id)
        wanted = {docs.message_doc_id(account_id, m): m for m in message_ids}
        found: dict[str, Message] = {}
        ids = list(wanted)
        with translating("get_messages"):
            for start in range(0, len(ids), 1_000):
                try:
                    entries = self._engine.mget(self.names.messages, ids[start:start + 1_000], routing=account_id)
                except EngineError as exc:
                    if exc.index_missing:
                        return found
                    raise
                for entry in entries:
                    source = entry.get("_source") or {}
                    if entry.get("found") and source.get("account_id") == account_id:
                        found[wanted[str(entry.get("_id"))]] = docs.message_from_document(source)
        return found

    def get_message(self, account_id: str, message_id: str) -> Message | None:
        """One message of the account with its body text, or None (also for another account's id)."""
        doc_id = docs.message_doc_id(account_id, message_id)
        with translating("get_message"):
            source = self._engine.get_document(self.names.messages, doc_id, routing=account_id)
        if source is None or source.get("account_id") != account_id:
            return None
        return docs.message_from_document(source)

    def get_mailbox(self, account_id: str) -> Mailbox | None:
        """The account's mailbox document, or None."""
        with translating("get_mailbox"):
            source = self._engine.get_document(self.names.mailboxes, docs.mailbox_doc_id(account_id),
                                               routing=account_id)
        if source is None or source.get("account_id") != account_id or source.get("kind") != docs.KIND_MAILBOX:
            return None
        return docs.mailbox_from_document(source)

    def list_folders(self, account_id: str) -> list[FolderView]:
        """The account's folders with the stored message and unread counts (one aggregation)."""
        docs.check_account_id(account_id)
        hits = self._search(self.names.mailboxes, account_id, {
            "query": {"bool": {"filter": [{"term": {"account_id": account_id}},
                                          {"term": {"kind": docs.KIND_FOLDER}}]}},
            "size": MAX_FOLDERS,
            "sort": [{"folder_id": {"order": "asc"}}],
        }, "list_folders")
        folders = [h["_source"] for h in hits if h.get("_source", {}).get("account_id") == account_id]
        counts: dict[str, tuple[int, int]] = {}
        if folders:
            resp = self._search_raw(self.names.messages, account_id, {
                "query": {"bool": {"filter": [{"term": {"account_id": account_id}}]}},
                "size": 0,
                "aggs": {"folders": {
                    "terms": {"field": "folder_id", "size": min(MAX_FOLDERS, len(folders) + 100)},
                    "aggs": {"unread": {"filter": {"term": {"is_read": False}}}},
                }},
            }, "list_folders")
            buckets = (((resp or {}).get("aggregations") or {}).get("folders") or {}).get("buckets") or []
            counts = {str(b["key"]): (int(b["doc_count"]), int(b["unread"]["doc_count"])) for b in buckets}
        views = []
        for source in folders:
            folder = docs.folder_from_document(source)
            stored, unread = counts.get(folder.folder_id, (0, 0))
            views.append(FolderView(folder=folder, stored_count=stored, stored_unread=unread,
                                    phase=source.get("phase")))
        return views

    def dead_letters(self, account_id: str, *, limit: int = 100) -> list[DeadLetter]:
        """The account's refused writes, newest first (operations and tests)."""
        docs.check_account_id(account_id)
        hits = self._search(self.names.deadletter, account_id, {
            "query": {"bool": {"filter": [{"term": {"account_id": account_id}}]}},
            "size": limit,
            "sort": [{"recorded_at": {"order": "desc"}}, {"doc_id": {"order": "asc"}}],
        }, "dead_letters")
        letters = []
        for hit in hits:
            s = hit["_source"]
            letters.append(DeadLetter(
                doc_id=str(s.get("doc_id")), account_id=str(s.get("account_id")), target=str(s.get("target")),
                action=str(s.get("action")), status=int(s.get("status", 0)), error_type=str(s.get("error_type")),
                reason=str(s.get("reason", "")), recorded_at=docs.parse_time(s.get("recorded_at")),
                document=s.get("document"),
            ))
        return letters

    def _search(self, index: str, account_id: str, body: dict[str, Any], what: str) -> list[dict[str, Any]]:
        resp = self._search_raw(index, account_id, body, what)
        if resp is None:
            return []
        hits: list[dict[str, Any]] = resp.get("hits", {}).get("hits", [])
        return hits

    def _search_raw(self, index: str, account_id: str, body: dict[str, Any], what: str) -> dict[str, Any] | None:
        """A search routed to the account's shard; None when the index does not exist (nothing stored)."""
        with translating(what):
            for wait_s in SHARD_START_WAITS_S:
                try:
                    return self._search_once(index, account_id, body)
                except EngineError as exc:
                    if not _shard_not_started(exc):
                        raise
                self._sleep(wait_s)
            return self._search_once(index, account_id, body)

    def _search_once(self, index: str, account_id: str, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self._engine.search(index, body, routing=account_id)
        except EngineError as exc:
            if exc.index_missing:
                log.warning("search on a missing index", extra={"index": index})
                return None
            raise


def _shard_not_started(exc: EngineError) -> bool:
    """A search refused because no copy of a shard is started (see ``SHARD_START_WAITS_S``)."""
    return exc.status == 503 and exc.error_type == "search_phase_execution_exception"
