"""The Elasticsearch adapter of the MessageStore port.

The only module that imports the ``elasticsearch`` client. It speaks to
Elasticsearch 8/9, and — with plain ``application/json`` (see
:class:`PlainJsonTransport`) — to osmem-server, the in-memory server our
tests and ``make run`` use.

Writes
------
* Bulk bodies are written directly: each action is encoded once with
  orjson into one NDJSON buffer per chunk (bounded by count and bytes) and
  sent with one ``client.bulk`` call, with ``require_alias`` so a deleted
  index is never silently re-created by a write with guessed mappings.
  (``helpers.streaming_bulk`` did the same with ~8-10 us of Python per
  document — action copying, re-chunking, per-item result dicts —
  measured by bench/pipeline.py; the chunking, retry and per-item rules
  below are the helper's, kept.)
* Messages are indexed with ``version_type=external_gte`` and the
  provider's version: an older write is answered 409 by the cluster and
  counted as *skipped* — never going backwards costs no read.
* Items refused with 429 (``es_rejected_execution_exception``), or a
  whole request answered 429, are retried, alone, with exponential
  back-off. Whatever is still
  refused after that — and item-level 5xx — makes the call raise
  ``StoreUnavailable`` *after* the rest of the batch was written, so the
  caller re-applies the page (idempotent).
* Any other refused item (mapping errors, a poison document) is logged
  with its id and reason, written to the dead-letter index and returned
  in ``BulkResult.failed_ids``. It never fails the rest of the batch.

Conditional removal
-------------------
A message that moved F→G may have its G-insert applied before F's
removal. ``remove_messages(F, ids)`` therefore reads each document
(realtime multi-get with ``_seq_no``/``_primary_term``) and deletes it only
if it still says F, with ``if_seq_no``/``if_primary_term`` so a write that
lands between the read and the delete makes the delete fail (409); those
ids are read again and re-decided. No scripts anywhere.

Reads
-----
Every read takes an ``account_id``, uses it as routing *and* adds a term
filter on it (routing alone only picks a shard, which other accounts
share). ``get_message`` checks the stored ``account_id`` as well.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, SerializationError, Transport, TransportError
from elastic_transport import TransportApiResponse as _TransportApiResponse
from elasticsearch import ApiError, Elasticsearch, NotFoundError
from elasticsearch.serializer import OrjsonSerializer

from mailsync.errors import ConfigurationError, InputError, StoreError, StoreUnavailable
from mailsync.models import (
    BulkResult,
    Folder,
    FolderView,
    Mailbox,
    Message,
    MessagePage,
    MessageQuery,
)
from mailsync.settings import Settings
from mailsync.store import documents as docs
from mailsync.store.mappings import (
    IndexNames,
    deadletter_mapping,
    index_settings,
    mailboxes_mapping,
    messages_mapping,
)

if TYPE_CHECKING:
    from mailsync.ports import MessageStore

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500
MAX_QUERY_CHARS = 1_000
MAX_FOLDERS = 10_000
REMOVE_ROUNDS = 5
_TEXT_FIELDS = ["subject", "from.name", "from.address.text", "body_preview", "body_text"]

# Sent by the client as application/vnd.elasticsearch+json; compatible-with=9.
_COMPAT_RE = re.compile(r"application/vnd\.elasticsearch\+([a-z0-9.\-]+)(\s*;\s*compatible-with=\d+)?")
# Elasticsearch quotes a slice of the refused value in mapping errors; that
# is message content and stays out of the logs (the dead letter keeps it).
_VALUE_PREVIEW_RE = re.compile(r"\s*Preview of field's value:.*$", re.DOTALL)


class PlainJsonTransport(Transport):
    """A Transport that sends plain ``application/json`` and ``application/x-ndjson``.

    The client always converts these to Elasticsearch's versioned vendor
    types (``application/vnd.elasticsearch+json; compatible-with=9``).
    OpenSearch and osmem-server answer those with 406; Elasticsearch 8/9
    accept plain JSON as well, so this is safe against every server.
    """

    def perform_request(
        self, method: str, target: str, *, headers: Any = None, **kwargs: Any
    ) -> _TransportApiResponse:
        if headers:
            headers = headers.copy()
            for name in ("accept", "content-type"):
                value = headers.get(name)
                if value:
                    headers[name] = _COMPAT_RE.sub(r"application/\1", value)
        return super().perform_request(method, target, headers=headers, **kwargs)


def make_client(url: str, *, api_key: str | None = None, plain_json: bool = True,
                request_timeout_s: float = 30.0, transport_class: type[Transport] | None = None) -> Elasticsearch:
    """An Elasticsearch client for ``url`` (plain JSON unless told otherwise).

    ``transport_class`` lets a test put a fault injector at the transport
    edge; it should derive from :class:`PlainJsonTransport` when
    ``plain_json`` is wanted.
    """
    cls = transport_class or (PlainJsonTransport if plain_json else Transport)
    return Elasticsearch(
        url,
        api_key=api_key,
        transport_class=cls,
        # orjson, not the stdlib: bulk bodies are one JSON document per message, and
        # bench/pipeline.py measured the stdlib encoder at ~14 us per message (orjson ~2).
        serializers={"application/json": OrjsonSerializer()},
        request_timeout=request_timeout_s,
        max_retries=2,
        retry_on_timeout=True,
    )


@dataclass(frozen=True)
class StoreOptions:
    """Tuning of the adapter. Defaults suit a small cluster; Settings overrides them."""

    prefix: str = "mailsync"
    body: docs.BodyPolicy = field(default_factory=docs.BodyPolicy)
    chunk_docs: int = 1_000
    chunk_bytes: int = 8 * 1024 * 1024
    max_retries: int = 5            # rounds of re-sending 429-refused items
    initial_backoff_s: float = 0.5  # doubled each round
    max_backoff_s: float = 30.0
    bulk_refresh_interval: str = "30s"
    bulk_lease_s: float = 3_600.0
    shards: int = 1
    replicas: int | None = None
    long_request_timeout_s: float = 600.0   # delete_by_query over a whole account


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


# One bulk action: the header line's object (``{op: metadata}``) and the
# source line's (None for a delete), as Elasticsearch's bulk API takes them.
_Action = tuple[dict[str, dict[str, Any]], dict[str, Any] | None]
# orjson appends the newline itself: concatenating b"\n" copied each ~1.5 KB line once more.
_NDJSON_LINE = orjson.OPT_APPEND_NEWLINE


@dataclass
class _Tally:
    """What one bulk call did, item by item."""

    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)   # 409s (meaning depends on the caller)
    transient: list[str] = field(default_factory=list)   # still 429 after retries, 5xx, index gone
    dead: list[dict[str, Any]] = field(default_factory=list)

    def result(self) -> BulkResult:
        return BulkResult(self.written, self.skipped, tuple(self.failed))


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


def _short_reason(reason: str) -> str:
    return _VALUE_PREVIEW_RE.sub("", reason)[:500]


def _error_parts(item: Mapping[str, Any]) -> tuple[str, str]:
    error = item.get("error")
    if isinstance(error, dict):
        return str(error.get("type", "unknown")), str(error.get("reason", ""))
    if error is None:
        return str(item.get("result", "unknown")), ""
    return "error", str(error)


def _raise_store_error(what: str, exc: Exception) -> NoReturn:
    """Translate a client exception into the project's errors (503-worthy ones to StoreUnavailable)."""
    if isinstance(exc, ApiError):
        status = exc.status_code
        error_type, reason = "", str(exc.message)
        if isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict):
            error_type, reason = _error_parts(exc.body)
        detail = f"{what}: {status} {error_type} {_short_reason(reason)}".strip()
        if status == 429 or status >= 500:
            raise StoreUnavailable(detail, retry_after_s=5.0) from exc
        raise StoreError(detail) from exc
    if isinstance(exc, TransportConnectionError | ConnectionTimeout):
        raise StoreUnavailable(f"{what}: search store unreachable ({type(exc).__name__})", retry_after_s=5.0) from exc
    if isinstance(exc, SerializationError):
        raise StoreError(f"{what}: {exc}") from exc
    if isinstance(exc, TransportError):
        raise StoreUnavailable(f"{what}: {exc}", retry_after_s=5.0) from exc
    raise exc


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except (ApiError, TransportError) as exc:
        _raise_store_error(what, exc)


def _is_index_missing(exc: ApiError) -> bool:
    return exc.status_code == 404 and isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict) \
        and exc.body["error"].get("type") == "index_not_found_exception"


class ElasticsearchStore:
    """MessageStore on Elasticsearch (or osmem / OpenSearch with plain JSON).

    The client is injected; :meth:`from_settings` builds one from Settings.
    Thread-safe as far as the client is (it is): share one per process.
    """

    def __init__(self, client: Elasticsearch, options: StoreOptions | None = None) -> None:
        self._es = client
        self.options = options or StoreOptions()
        self.names = IndexNames(self.options.prefix)

    @classmethod
    def from_settings(cls, settings: Settings, *, client: Elasticsearch | None = None) -> ElasticsearchStore:
        """The store described by ``settings`` (ELASTICSEARCH_URL, _API_KEY, _PLAIN_JSON, prefix, body policy)."""
        if client is None:
            if not settings.elasticsearch_url:
                raise ConfigurationError("ELASTICSEARCH_URL is not set")
            client = make_client(settings.elasticsearch_url, api_key=settings.elasticsearch_api_key,
                                 plain_json=settings.elasticsearch_plain_json)
        options = StoreOptions(
            prefix=settings.index_prefix,
            body=docs.BodyPolicy(store=settings.store_body_text, max_chars=settings.body_text_max_chars),
            chunk_docs=settings.elasticsearch_bulk_docs,
            chunk_bytes=settings.elasticsearch_bulk_bytes,
            shards=settings.elasticsearch_shards,
        )
        return cls(client, options)

    @property
    def client(self) -> Elasticsearch:
        return self._es

    def close(self) -> None:
        self._es.close()

    # ------------------------------------------------------------------ indices and generation

    def ensure_ready(self) -> str:
        """Create the indices and aliases that are missing; return the generation id."""
        generation = uuid.uuid4().hex
        families = (
            (self.names.messages, self.names.messages_index, messages_mapping(generation)),
            (self.names.mailboxes, self.names.mailboxes_index, mailboxes_mapping(generation)),
            (self.names.deadletter, self.names.deadletter_index, deadletter_mapping()),
        )
        with _translate("ensure_ready"):
            for alias, index, mapping in families:
                if self._es.indices.exists_alias(name=alias):
                    continue
                if self._es.indices.exists(index=index):
                    # The physical index survived but lost its alias (a botched swap).
                    self._es.indices.put_alias(index=index, name=alias)
                    continue
                try:
                    self._es.indices.create(
                        index=index,
                        mappings=mapping,
                        settings=index_settings(shards=self.options.shards, replicas=self.options.replicas),
                        aliases={alias: {"is_write_index": True}},
                    )
                    log.info("created index", extra={"index": index, "alias": alias})
                except ApiError as exc:
                    # Another worker created it between our check and our create.
                    if not (isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict)
                            and exc.body["error"].get("type") == "resource_already_exists_exception"):
                        raise
        return self._read_generation()

    def generation(self) -> str:
        """The current generation id; creates missing indices first (so the id then changes).

        Derived from the ``_meta.generation`` written at creation and the
        cluster's uuid of each physical index, which also changes when an
        index is restored from a snapshot.
        """
        try:
            return self._read_generation()
        except _IndicesMissing:
            return self.ensure_ready()

    def _read_generation(self) -> str:
        # The dead-letter index is fetched too, so a missing one gets recreated, but not part of the id.
        wanted = f"{self.names.messages},{self.names.mailboxes},{self.names.deadletter}"
        try:
            found = self._es.indices.get(index=wanted)
        except NotFoundError as exc:
            raise _IndicesMissing() from exc
        except (ApiError, TransportError) as exc:
            _raise_store_error("generation", exc)
        parts: list[str] = []
        families: set[str] = set()
        for name in sorted(found.body):
            info = found.body[name]
            meta = (info.get("mappings") or {}).get("_meta") or {}
            uuid_ = ((info.get("settings") or {}).get("index") or {}).get("uuid", "")
            family = str(meta.get("family", ""))
            families.add(family)
            if family != "deadletter":
                parts.append(f"{name}={meta.get('generation', '')}/{uuid_}")
        if not {"messages", "mailboxes"} <= families:
            raise StoreError(f"indices behind {wanted} were not created by mailsync (no _meta.family)")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def refresh(self) -> None:
        """Make every write so far visible to searches."""
        with _translate("refresh"):
            self._es.indices.refresh(index=[self.names.messages, self.names.mailboxes])

    # ------------------------------------------------------------------ bulk load mode

    def begin_bulk_load(self, account_id: str) -> None:
        """Relax the messages index refresh interval while ``account_id`` runs an initial load.

        The index is shared, so each loading account holds a lease document
        (expiring after ``bulk_lease_s``); the interval is restored when the
        last live lease ends. A crashed loader leaves only a slower refresh.
        """
        lease_id = docs.bulk_load_doc_id(account_id)
        expires = datetime.now(UTC) + timedelta(seconds=self.options.bulk_lease_s)
        with _translate("begin_bulk_load"):
            self._es.index(
                index=self.names.mailboxes, id=lease_id, routing=account_id, refresh=True, require_alias=True,
                document={"kind": docs.KIND_BULK_LOAD, "account_id": account_id,
                          "expires_at": docs.iso_time(expires),
                          "updated_at": docs.now_iso()},
            )
            self._es.indices.put_settings(
                index=self.names.messages, settings={"index": {"refresh_interval": self.options.bulk_refresh_interval}}
            )

    def end_bulk_load(self, account_id: str) -> None:
        """End ``account_id``'s lease; restore the default refresh interval if no live lease remains."""
        lease_id = docs.bulk_load_doc_id(account_id)
        with _translate("end_bulk_load"):
            with contextlib.suppress(NotFoundError):
                self._es.delete(index=self.names.mailboxes, id=lease_id, routing=account_id, refresh=True)
            # Deliberately across accounts: leases are store bookkeeping, not mail.
            live = self._es.count(index=self.names.mailboxes, query={"bool": {"filter": [
                {"term": {"kind": docs.KIND_BULK_LOAD}},
                {"range": {"expires_at": {"gt": docs.now_iso()}}},
            ]}})["count"]
            if live == 0:
                self._es.indices.put_settings(index=self.names.messages, settings={"index": {"refresh_interval": None}})
                self._es.indices.refresh(index=self.names.messages)

    @contextlib.contextmanager
    def bulk_load(self, account_id: str) -> Iterator[None]:
        """``with store.bulk_load(account):`` — begin/end around an initial load."""
        self.begin_bulk_load(account_id)
        try:
            yield
        finally:
            self.end_bulk_load(account_id)

    # ------------------------------------------------------------------ bulk machinery

    def _bulk(self, actions: Iterable[_Action], *, target: str, what: str,
              originals: Mapping[str, dict[str, Any]] | None = None,
              max_retries: int | None = None) -> _Tally:
        """Send ``actions`` in chunks and sort each item's outcome.

        ``originals`` maps doc ids to what was sent, for the dead letter.
        """
        tally = _Tally()
        retries = self.options.max_retries if max_retries is None else max_retries
        try:
            for chunk in self._chunks(actions):
                self._send_chunk(chunk, tally, target=target, originals=originals, max_retries=retries)
        except (ApiError, TransportError) as exc:
            _raise_store_error(what, exc)
        return tally

    def _chunks(self, actions: Iterable[_Action]) -> Iterator[list[tuple[str, bytes]]]:
        """Encoded actions ``(op, header+source lines)``, grouped by ``chunk_docs`` and ``chunk_bytes``.

        An action larger than ``chunk_bytes`` goes alone (the cluster then
        decides), as the client's helper did.
        """
        limit_docs, limit_bytes = self.options.chunk_docs, self.options.chunk_bytes
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

    def _send_chunk(self, chunk: list[tuple[str, bytes]], tally: _Tally, *, target: str,
                    originals: Mapping[str, dict[str, Any]] | None, max_retries: int) -> None:
        """One chunk, with the 429 rule: refused items (or a refused request) again, alone, with back-off."""
        for attempt in range(max_retries + 1):
            if attempt:
                time.sleep(min(self.options.max_backoff_s, self.options.initial_backoff_s * 2 ** (attempt - 1)))
            try:
                # The body is ready NDJSON: the client's serializer passes bytes through as they are
                # (its stubs only know the list-of-dicts form).
                body = b"".join(lines for _, lines in chunk)
                resp = self._es.bulk(operations=body, require_alias=True)  # type: ignore[arg-type]
            except ApiError as exc:
                if attempt == max_retries or exc.status_code != 429:
                    raise
                continue
            items: list[dict[str, dict[str, Any]]] = resp.body.get("items") or []
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

    def _tally_item(self, tally: _Tally, ok: bool, op: str, item: Mapping[str, Any], target: str,
                    originals: Mapping[str, dict[str, Any]] | None) -> None:
        doc_id = str(item.get("_id", ""))
        status = int(item.get("status", 500))
        if ok:
            if item.get("result") == "noop":
                tally.skipped += 1
            else:
                tally.written += 1
            return
        error_type, reason = _error_parts(item)
        if status == 409:
            tally.conflicts.append(doc_id)
        elif op == "delete" and status == 404 and error_type == "not_found":
            tally.skipped += 1   # already gone
        elif status == 429 or status >= 500 or error_type == "index_not_found_exception":
            tally.transient.append(doc_id)
            log.warning("store write refused for now", extra={
                "doc_id": doc_id, "status": status, "error_type": error_type, "reason": _short_reason(reason)})
        else:
            self._dead(tally, doc_id=doc_id, routing=str(item.get("_routing") or ""), target=target, action=op,
                       status=status, error_type=error_type, reason=reason,
                       document=(originals or {}).get(doc_id))

    def _dead(self, tally: _Tally, *, doc_id: str, routing: str, target: str, action: str, status: int,
              error_type: str, reason: str, document: dict[str, Any] | None) -> None:
        account_id = routing or (str(document.get("account_id", "")) if document else "") \
            or doc_id.partition(":")[0]
        log.error("store write refused; kept in the dead-letter index", extra={
            "doc_id": doc_id, "target": target, "status": status, "error_type": error_type,
            "reason": _short_reason(reason)})
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

    def _flush_dead(self, tally: _Tally) -> None:
        """Write the dead letters; if even that fails, the error log above is the record."""
        if not tally.dead:
            return
        actions: list[_Action] = [({"index": {
            "_index": self.names.deadletter,
            "_id": f"{letter['target']}:{letter['doc_id']}",
            "routing": letter["account_id"],
        }}, letter) for letter in tally.dead]
        try:
            written = self._bulk(actions, target="deadletter", what="dead letters", max_retries=2)
        except StoreError as exc:
            log.error("could not write dead letters", extra={"count": len(actions), "error": type(exc).__name__})
        else:
            # A dead letter refused in turn is not dead-lettered again: the error log is its record.
            for doc_id in written.conflicts + written.transient + written.failed:
                log.error("could not write a dead letter", extra={"doc_id": doc_id})
        tally.dead = []

    def _finish(self, tally: _Tally, what: str) -> BulkResult:
        self._flush_dead(tally)
        if tally.transient:
            raise StoreUnavailable(
                f"{what}: {len(tally.transient)} item(s) refused by an overloaded or missing index "
                f"(first: {tally.transient[0]}); the rest was applied, re-apply the batch",
                retry_after_s=5.0,
            )
        return tally.result()

    # ------------------------------------------------------------------ message writes

    def upsert_messages(self, messages: Sequence[Message], *, epoch: int = 0) -> BulkResult:
        """Index messages with their provider version; an older version than stored is skipped.

        ``epoch`` is written as ``sync_epoch`` (see :meth:`remove_stale`).
        Invalid messages (no id, bad version, bad account id) never reach
        the cluster: they go to the dead letter like refused ones.
        """
        tally = _Tally()
        originals: dict[str, dict[str, Any]] = {}
        actions: list[_Action] = []
        indexed_at = docs.now_iso()
        for message in messages:
            try:
                docs.check_message(message)
                doc = docs.message_to_document(message, epoch=epoch, body=self.options.body, indexed_at=indexed_at)
            except InputError as exc:
                self._dead(tally, doc_id=f"{message.account_id}:{message.message_id}", routing="",
                           target="messages", action="index", status=400, error_type=exc.code,
                           reason=exc.message, document=_raw_message(message))
                continue
            doc_id = docs.message_doc_id(message.account_id, message.message_id)
            originals[doc_id] = doc
            actions.append(self.message_action(doc_id, message, doc))
        if actions:
            sent = self._bulk(actions, target="messages", what="upsert_messages", originals=originals)
            tally.written += sent.written
            tally.skipped += sent.skipped + len(sent.conflicts)   # 409 = an equal-or-newer version is stored
            tally.failed += sent.failed
            tally.transient += sent.transient
            tally.dead += sent.dead
        return self._finish(tally, "upsert_messages")

    def message_action(self, doc_id: str, message: Message, doc: dict[str, Any]) -> _Action:
        """The bulk action indexing ``doc``: external_gte version, routed by account."""
        return ({"index": {
            "_index": self.names.messages,
            "_id": doc_id,
            "routing": message.account_id,
            "version": message.version,
            "version_type": "external_gte",
        }}, doc)

    def remove_messages(self, account_id: str, folder_id: str, message_ids: Sequence[str]) -> BulkResult:
        """Delete the messages that still say ``folder_id``; moved or missing ones count as skipped."""
        docs.check_account_id(account_id)
        pending = list(dict.fromkeys(docs.message_doc_id(account_id, m) for m in message_ids))
        tally = _Tally()
        for _ in range(REMOVE_ROUNDS):
            if not pending:
                break
            actions: list[_Action] = []
            for doc_id, found in self._read_for_removal(account_id, pending):
                if found is None:
                    tally.skipped += 1
                    continue
                source, seq_no, primary_term = found
                if source.get("folder_id") != folder_id or source.get("account_id") != account_id:
                    tally.skipped += 1   # moved away: the destination folder owns it now
                    continue
                actions.append(({"delete": {"_index": self.names.messages, "_id": doc_id, "routing": account_id,
                                            "if_seq_no": seq_no, "if_primary_term": primary_term}}, None))
            if not actions:
                pending = []
                break
            round_ = self._bulk(actions, target="messages", what="remove_messages")
            tally.written += round_.written
            tally.skipped += round_.skipped
            tally.failed += round_.failed
            tally.dead += round_.dead
            tally.transient += round_.transient
            pending = round_.conflicts   # changed since we read it: read again and decide again
        tally.transient += pending       # still racing after every round: let the caller retry
        return self._finish(tally, "remove_messages")

    def _read_for_removal(self, account_id: str, doc_ids: Sequence[str]
                          ) -> Iterator[tuple[str, tuple[dict[str, Any], int, int] | None]]:
        with _translate("remove_messages"):
            for start in range(0, len(doc_ids), 1_000):
                chunk = list(doc_ids[start:start + 1_000])
                try:
                    resp = self._es.mget(index=self.names.messages, ids=chunk, routing=account_id,
                                         source_includes=["account_id", "folder_id"], realtime=True)
                except NotFoundError as exc:
                    if _is_index_missing(exc):
                        raise StoreUnavailable("remove_messages: messages index missing", retry_after_s=5.0) from exc
                    raise
                for entry in resp.body.get("docs", []):
                    doc_id = str(entry.get("_id"))
                    if not entry.get("found"):
                        yield doc_id, None
                    else:
                        yield doc_id, (entry.get("_source") or {}, int(entry["_seq_no"]), int(entry["_primary_term"]))

    def remove_stale(self, account_id: str, folder_id: str, epoch: int) -> int:
        """Delete the folder's messages whose ``sync_epoch`` is below ``epoch``; return how many."""
        docs.check_account_id(account_id)
        return self._delete_by_query(self.names.messages, account_id, [
            {"term": {"folder_id": folder_id}},
            {"range": {"sync_epoch": {"lt": epoch}}},
        ], "remove_stale")

    def _delete_by_query(self, index: str, account_id: str, filters: list[dict[str, Any]], what: str) -> int:
        query = {"bool": {"filter": [{"term": {"account_id": account_id}}, *filters]}}
        es = self._es.options(request_timeout=self.options.long_request_timeout_s)
        with _translate(what):
            try:
                # delete_by_query sees only refreshed documents.
                es.indices.refresh(index=index)
                resp = es.delete_by_query(index=index, routing=account_id, query=query, conflicts="proceed",
                                          refresh=True, wait_for_completion=True)
            except NotFoundError as exc:
                if _is_index_missing(exc):
                    return 0
                raise
        failures = resp.body.get("failures") or []
        if failures:
            raise StoreUnavailable(f"{what}: {len(failures)} deletion(s) failed; retry", retry_after_s=5.0)
        return int(resp.body.get("deleted", 0))

    # ------------------------------------------------------------------ mailboxes writes

    def upsert_folders(self, folders: Sequence[Folder], *, phase: str | None = None) -> None:
        """Create or update folder documents; ``phase`` (when given) is set on each, else kept."""
        actions: list[_Action] = []
        originals: dict[str, dict[str, Any]] = {}
        updated_at = docs.now_iso()
        for folder in folders:
            doc = docs.folder_to_document(folder, phase=phase, updated_at=updated_at)
            doc_id = docs.folder_doc_id(folder.account_id, folder.folder_id)
            originals[doc_id] = doc
            actions.append(({"update": {"_index": self.names.mailboxes, "_id": doc_id, "routing": folder.account_id,
                                        "retry_on_conflict": 3}}, {"doc": doc, "doc_as_upsert": True}))
        if actions:
            tally = self._bulk(actions, target="mailboxes", what="upsert_folders", originals=originals)
            tally.transient += tally.conflicts
            self._finish(tally, "upsert_folders")

    def set_folder_phase(self, account_id: str, folder_id: str, phase: str) -> bool:
        """Set the sync phase of an existing folder document; False (nothing written) when it is gone.

        Only ``phase`` changes: name and parent belong to the folder list,
        which may have renamed or moved the folder while its round ran. No
        upsert either, so a folder removed meanwhile is not brought back.
        """
        doc_id = docs.folder_doc_id(account_id, folder_id)
        with _translate("set_folder_phase"):
            try:
                self._es.update(index=self.names.mailboxes, id=doc_id, routing=account_id, retry_on_conflict=3,
                                require_alias=True, doc={"phase": phase, "updated_at": docs.now_iso()})
            except NotFoundError as exc:
                if _is_index_missing(exc):
                    # Like a bulk write: never auto-create the index; the generation check resyncs.
                    raise StoreUnavailable("set_folder_phase: the mailboxes index is missing",
                                           retry_after_s=5.0) from exc
                return False   # document_missing_exception: the folder was removed
        return True

    def remove_folder(self, account_id: str, folder_id: str) -> None:
        """Delete a folder document and every message still in it."""
        doc_id = docs.folder_doc_id(account_id, folder_id)
        with _translate("remove_folder"), contextlib.suppress(NotFoundError):
            self._es.delete(index=self.names.mailboxes, id=doc_id, routing=account_id)
        self._delete_by_query(self.names.messages, account_id, [{"term": {"folder_id": folder_id}}],
                              "remove_folder")

    def upsert_mailbox(self, mailbox: Mailbox) -> None:
        """Create or replace the account's mailbox document."""
        doc = docs.mailbox_to_document(mailbox)
        with _translate("upsert_mailbox"):
            self._es.index(index=self.names.mailboxes, id=docs.mailbox_doc_id(mailbox.account_id),
                           routing=mailbox.account_id, document=doc, require_alias=True)

    def delete_account(self, account_id: str) -> None:
        """Delete every document of the account: messages, mailbox and folders, leases, dead letters."""
        docs.check_account_id(account_id)
        for index in (self.names.messages, self.names.mailboxes, self.names.deadletter):
            self._delete_by_query(index, account_id, [], "delete_account")

    # ------------------------------------------------------------------ reads

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
            "source_excludes": list(docs.LIST_EXCLUDES),
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

    def get_message(self, account_id: str, message_id: str) -> Message | None:
        """One message of the account with its body text, or None (also for another account's id)."""
        doc_id = docs.message_doc_id(account_id, message_id)
        with _translate("get_message"):
            try:
                resp = self._es.get(index=self.names.messages, id=doc_id, routing=account_id)
            except NotFoundError:
                return None
        source = resp.body.get("_source") or {}
        if source.get("account_id") != account_id:
            return None
        return docs.message_from_document(source)

    def get_mailbox(self, account_id: str) -> Mailbox | None:
        """The account's mailbox document, or None."""
        with _translate("get_mailbox"):
            try:
                resp = self._es.get(index=self.names.mailboxes, id=docs.mailbox_doc_id(account_id),
                                    routing=account_id)
            except NotFoundError:
                return None
        source = resp.body.get("_source") or {}
        if source.get("account_id") != account_id or source.get("kind") != docs.KIND_MAILBOX:
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
        with _translate(what):
            try:
                resp = self._es.search(index=index, routing=account_id, **body)
            except NotFoundError as exc:
                if _is_index_missing(exc):
                    log.warning("search on a missing index", extra={"index": index})
                    return None
                raise
        result: dict[str, Any] = resp.body
        return result


class _IndicesMissing(Exception):
    """Internal: an alias the store needs does not exist."""


def _doc_id_of(lines: bytes) -> str:
    """The ``_id`` in an encoded action's header line (only for the rare short-answer report)."""
    header: dict[str, dict[str, Any]] = orjson.loads(lines.split(b"\n", 1)[0])
    return str(next(iter(header.values())).get("_id", ""))


def _raw_message(message: Message) -> dict[str, Any]:
    """A JSON-safe copy of an invalid message for the dead letter (no body text)."""
    return {
        "account_id": str(message.account_id),
        "message_id": str(message.message_id),
        "folder_id": str(message.folder_id),
        "version": str(message.version),
        "subject": docs.clean_text(str(message.subject))[:1_000],
    }


if TYPE_CHECKING:   # mypy proves the adapter implements the port
    def _implements_port(store: ElasticsearchStore) -> MessageStore:
        return store
