"""The search store: the MessageStore port on a search engine, written once for every engine.

All the store's rules live here: index families and their ``_meta``
generation, versioned bulk writes, conditional removals, routing and
tenant filters, reads and cursors, bulk-load refresh leases, dead
letters. The cluster is reached only through
:class:`mailsync.store.engine.SearchEngine` (REST calls with dict bodies),
which ``mailsync/store/engines/`` implements once per client library:
OpenSearch with ``opensearch-py``, Elasticsearch 8/9 with
``elasticsearch``.

Writes
------
* Messages are indexed with ``version_type=external_gte`` and the
  provider's version: an older write is answered 409 by the cluster and
  counted as *skipped* — never going backwards costs no read.
* Every write goes through :class:`mailsync.store.bulk_writer.BulkWriter`
  (chunks, concurrent requests, the 429 rule, dead letters), with
  ``require_alias`` so a deleted index is never silently re-created by a
  write with guessed mappings. Transient refusals make the call raise
  ``StoreUnavailable`` *after* the rest of the batch was written, so the
  caller re-applies the page (idempotent); a poison document goes to the
  dead-letter index and never fails the rest.

Conditional removal
-------------------
A message that moved F→G may have its G-insert applied before F's
removal. ``remove_messages(F, ids)`` therefore reads each document
(realtime multi-get with ``_seq_no``/``_primary_term``) and deletes it only
if it still says F, with ``if_seq_no``/``if_primary_term`` so a write that
lands between the read and the delete makes the delete fail (409); those
ids are read again and re-decided. No scripts anywhere.

Seen marks
----------
A refused write still saw its message: that is recorded as a mark of the
writer's folder and epoch in the ``<prefix>-seen`` index, which
``remove_stale`` honours (``_carry_epoch``, ``raise_epoch``). Never on the
message's document: any update of it would raise its external version by
one (:mod:`mailsync.store.seen_marks` says why that lost messages).

Reads
-----
In :mod:`mailsync.store.reads`: every read is routed by ``account_id``
*and* filtered on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mailsync.errors import InputError, StoreError, StoreUnavailable
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
from mailsync.store.bulk_writer import BulkAction, BulkLimits, BulkWriter, Tally
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engine_errors import error_parts, raise_store_error, short_reason, translating
from mailsync.store.mappings import (
    IndexNames,
    actions_mapping,
    deadletter_mapping,
    index_settings,
    mailboxes_mapping,
    messages_mapping,
    seen_mapping,
)
from mailsync.store.notified_writes import NotifiedWrite, NotifiedWrites
from mailsync.store.reads import DeadLetter, StoreReads
from mailsync.store.seen_marks import SeenMarks, Sighting

if TYPE_CHECKING:
    from mailsync.ports import MessageStore

log = logging.getLogger(__name__)

REMOVE_ROUNDS = 5



@dataclass(frozen=True)
class StoreOptions:
    """Tuning of the adapter. Defaults suit a small cluster; Settings overrides them."""

    prefix: str = "mailsync"
    body: docs.BodyPolicy = field(default_factory=docs.BodyPolicy)
    chunk_docs: int = 1_000
    chunk_bytes: int = 8 * 1024 * 1024
    # Chunks of one call in flight at once: a node indexes each _bulk request on one
    # write thread per shard, so with 1 shard a second request keeps another core busy.
    bulk_writers: int = 2
    max_retries: int = 5            # rounds of re-sending 429-refused items
    initial_backoff_s: float = 0.5  # doubled each round
    max_backoff_s: float = 30.0
    # The messages index's refresh interval while an initial load runs (begin_bulk_load), and how
    # long a loader's lease lives: longer than an invocation's paging (SYNC_TIME_BUDGET_S plus its
    # last writes), short enough that a dead loader's relaxed refresh is undone within minutes.
    bulk_refresh_interval: str = "30s"
    bulk_lease_s: float = 180.0
    shards: int = 1
    replicas: int | None = None
    long_request_timeout_s: float = 600.0   # delete_by_query over a whole account


class SearchStore:
    """MessageStore on a search engine (OpenSearch or Elasticsearch, see ``mailsync/store/engines/``).

    The engine is injected; :meth:`from_settings` connects one from Settings.
    Thread-safe as far as the engine's client is (both are): share one per process.
    """

    def __init__(self, engine: SearchEngine, options: StoreOptions | None = None, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        """``clock``: the time bulk-load leases are given and judged by (tests move it)."""
        self._engine = engine
        self._clock = clock
        self.options = options or StoreOptions()
        self.names = IndexNames(self.options.prefix)
        self._writer = BulkWriter(engine, BulkLimits(
            chunk_docs=self.options.chunk_docs, chunk_bytes=self.options.chunk_bytes,
            bulk_writers=self.options.bulk_writers, max_retries=self.options.max_retries,
            initial_backoff_s=self.options.initial_backoff_s, max_backoff_s=self.options.max_backoff_s,
        ), deadletter_index=self.names.deadletter)
        self._reads = StoreReads(engine, self.names)
        self._marks = SeenMarks(engine, self.names)
        self._notified = NotifiedWrites(engine, self.names, self.options.body)

    @classmethod
    def from_settings(cls, settings: Settings, *, engine: SearchEngine | None = None) -> SearchStore:
        """The store described by ``settings`` (ELASTICSEARCH_URL, SEARCH_ENGINE, prefix, body policy, bulk sizes)."""
        if engine is None:
            from mailsync.store.engines import connect_from_settings

            engine = connect_from_settings(settings)
        options = StoreOptions(
            prefix=settings.index_prefix,
            body=docs.BodyPolicy(store=settings.store_body_text, max_chars=settings.body_text_max_chars),
            chunk_docs=settings.elasticsearch_bulk_docs,
            chunk_bytes=settings.elasticsearch_bulk_bytes,
            bulk_writers=settings.elasticsearch_bulk_writers,
            shards=settings.elasticsearch_shards,
            replicas=settings.elasticsearch_replicas,
        )
        return cls(engine, options)

    @property
    def engine(self) -> SearchEngine:
        return self._engine

    @property
    def bulk_writer(self) -> BulkWriter:
        """How this store's bulk requests travel (bench/engine_cpu.py times its encoding)."""
        return self._writer

    def close(self) -> None:
        self._writer.close()
        self._engine.close()

    # ------------------------------------------------------------------ indices and generation

    def ensure_ready(self) -> str:
        """Create the indices and aliases that are missing; return the generation id."""
        generation = uuid.uuid4().hex
        families = (
            (self.names.messages, self.names.messages_index, messages_mapping(generation)),
            (self.names.mailboxes, self.names.mailboxes_index, mailboxes_mapping(generation)),
            (self.names.deadletter, self.names.deadletter_index, deadletter_mapping()),
            (self.names.actions, self.names.actions_index, actions_mapping()),
            (self.names.seen, self.names.seen_index, seen_mapping()),
        )
        with translating("ensure_ready"):
            for alias, index, mapping in families:
                if self._engine.alias_exists(alias):
                    continue
                if self._engine.index_exists(index):
                    # The physical index survived but lost its alias (a botched swap).
                    self._engine.put_alias(index, alias)
                    continue
                try:
                    self._engine.create_index(
                        index,
                        mappings=mapping,
                        settings=index_settings(shards=self.options.shards, replicas=self.options.replicas),
                        aliases={alias: {"is_write_index": True}},
                    )
                    log.info("created index", extra={"index": index, "alias": alias})
                except EngineError as exc:
                    # Another worker created it between our check and our create.
                    if exc.error_type != "resource_already_exists_exception":
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
        # The dead-letter and seen-mark indices are fetched too, so a missing one gets recreated (a store
        # created before the marks existed gets them here), but they are not part of the id.
        wanted = [self.names.messages, self.names.mailboxes, self.names.deadletter, self.names.seen]
        try:
            found = self._engine.get_indices(wanted)
        except EngineError as exc:
            if exc.index_missing:
                raise _IndicesMissing() from exc
            raise_store_error("generation", exc)
        parts: list[str] = []
        families: set[str] = set()
        for name in sorted(found):
            info = found[name]
            meta = (info.get("mappings") or {}).get("_meta") or {}
            uuid_ = ((info.get("settings") or {}).get("index") or {}).get("uuid", "")
            family = str(meta.get("family", ""))
            families.add(family)
            if family not in ("deadletter", "seen"):
                parts.append(f"{name}={meta.get('generation', '')}/{uuid_}")
        if not {"messages", "mailboxes"} <= families:
            raise StoreError(f"indices behind {','.join(wanted)} were not created by mailsync (no _meta.family)")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def refresh(self) -> None:
        """Make every write so far visible to searches."""
        with translating("refresh"):
            self._engine.refresh([self.names.messages, self.names.mailboxes])

    # ------------------------------------------------------------------ bulk load mode

    def begin_bulk_load(self, account_id: str, holder: str = "") -> None:
        """Relax the messages index's refresh interval while ``account_id`` (its ``holder``) runs an initial load.

        The index is shared by every account, and several workers load
        folders of one account at once, so each loader holds a lease
        document of its own (per account and holder, expiring after
        ``bulk_lease_s``) and the interval is restored when the last live
        lease ends (:meth:`end_bulk_load`). Nothing depends on the lease for
        correctness: a lease that lapses while its load still runs only
        makes that load slower, and one a crashed loader left behind is
        swept by :meth:`expire_bulk_loads` (the poll tick calls it) once it
        has expired. The relaxed interval is finite (not ``-1``), so even
        then writes become visible, only later.
        """
        lease_id = docs.bulk_load_doc_id(account_id, holder)
        expires = self._clock() + timedelta(seconds=self.options.bulk_lease_s)
        with translating("begin_bulk_load"):
            # The lease first (refreshed, so a concurrent end's count sees it), then the
            # setting: a relaxed interval never exists without a live lease behind it.
            self._engine.index_document(
                self.names.mailboxes, lease_id, routing=account_id, refresh=True,
                document={"kind": docs.KIND_BULK_LOAD, "account_id": account_id,
                          "expires_at": docs.iso_time(expires),
                          "updated_at": docs.now_iso()},
            )
            self._engine.put_settings(
                self.names.messages, {"index": {"refresh_interval": self.options.bulk_refresh_interval}})

    def end_bulk_load(self, account_id: str, holder: str = "") -> None:
        """End one lease; restore the default refresh interval (and refresh) if no live lease remains.

        Settings have no compare-and-set, so an end can race a begin: the end
        counts no live lease, the begin writes its lease and relaxes the
        interval, then the end restores the default under a running load. So
        the end counts again after restoring and relaxes once more if a lease
        appeared: a begin writes its lease (refreshed) before it relaxes, so a
        begin whose relaxing the restore overwrote has its lease counted here.
        What remains is a moment of default refresh for that load: slower,
        never wrong (only speed depends on the interval).
        """
        lease_id = docs.bulk_load_doc_id(account_id, holder)
        with translating("end_bulk_load"):
            self._engine.delete_document(self.names.mailboxes, lease_id, routing=account_id, refresh=True)
            if self._live_bulk_loads() == 0:
                self._engine.put_settings(self.names.messages, {"index": {"refresh_interval": None}})
                if self._live_bulk_loads() > 0:
                    self._engine.put_settings(
                        self.names.messages, {"index": {"refresh_interval": self.options.bulk_refresh_interval}})
                    return
                self._engine.refresh([self.names.messages])

    def expire_bulk_loads(self) -> bool:
        """Restore the default refresh interval if it is still relaxed but no lease is live; True if it did.

        For loaders that died without :meth:`end_bulk_load` (a killed
        worker, a host timeout): their leases expire, and this brings the
        index back to its normal refresh. Only the interval a load set is
        reset, never one an operator chose. Cheap (a count and a settings
        read), so the poll tick calls it every minute.
        """
        with translating("expire_bulk_loads"):
            try:
                if self._live_bulk_loads() > 0:
                    return False
                found = self._engine.get_settings(self.names.messages)
            except EngineError as exc:
                if exc.index_missing:
                    return False
                raise
            current = {((info.get("settings") or {}).get("index") or {}).get("refresh_interval")
                       for info in found.values()}
            if current != {self.options.bulk_refresh_interval}:
                return False
            self._engine.put_settings(self.names.messages, {"index": {"refresh_interval": None}})
            self._engine.refresh([self.names.messages])
        log.warning("bulk-load refresh interval restored: its loaders ended without saying so (leases expired)")
        return True

    def _live_bulk_loads(self) -> int:
        # Deliberately across accounts: leases are store bookkeeping, not mail.
        return self._engine.count(self.names.mailboxes, {"bool": {"filter": [
            {"term": {"kind": docs.KIND_BULK_LOAD}},
            {"range": {"expires_at": {"gt": docs.iso_time(self._clock())}}},
        ]}})

    @contextlib.contextmanager
    def bulk_load(self, account_id: str, holder: str = "") -> Iterator[None]:
        """``with store.bulk_load(account):`` — begin/end around an initial load."""
        self.begin_bulk_load(account_id, holder)
        try:
            yield
        finally:
            self.end_bulk_load(account_id, holder)


    # ------------------------------------------------------------------ message writes

    def upsert_messages(self, messages: Sequence[Message], *, epoch: int = 0) -> BulkResult:
        """Index messages with their provider version; an older version than stored is skipped.

        ``epoch`` is written as ``sync_epoch`` (see :meth:`remove_stale`).
        Invalid messages (no id, bad version, bad account id) never reach
        the cluster: they go to the dead letter like refused ones.
        """
        tally = Tally()
        originals: dict[str, dict[str, Any]] = {}
        message_ids: dict[str, str] = {}
        actions: list[BulkAction] = []
        indexed_at = docs.now_iso()
        for message in messages:
            try:
                docs.check_message(message)
                doc = docs.message_to_document(message, epoch=epoch, body=self.options.body, indexed_at=indexed_at)
            except InputError as exc:
                self._writer.dead(tally, doc_id=f"{message.account_id}:{message.message_id}", routing="",
                           target="messages", action="index", status=400, error_type=exc.code,
                           reason=exc.message, document=_raw_message(message))
                continue
            doc_id = docs.message_doc_id(message.account_id, message.message_id)
            originals[doc_id] = doc
            message_ids[doc_id] = message.message_id
            actions.append(self.message_action(doc_id, message, doc))
        stale: list[str] = []
        if actions:
            sent = self._writer.send(actions, target="messages", what="upsert_messages", originals=originals)
            tally.written += sent.written
            tally.skipped += sent.skipped + len(sent.conflicts)   # 409 = an equal-or-newer version is stored
            tally.failed += sent.failed
            tally.transient += sent.transient
            tally.dead += sent.dead
            stale = [message_ids[d] for d in sent.conflicts if d in message_ids]
            if epoch and sent.conflicts:
                refused = [Sighting(originals[d]["account_id"], originals[d]["folder_id"], message_ids[d])
                           for d in sent.conflicts if d in originals]
                carried = self._carry_epoch(refused, epoch)
                tally.transient += carried.transient
                tally.failed += carried.failed
                tally.dead += carried.dead
        return replace(self._writer.finish(tally, "upsert_messages"), stale_ids=tuple(stale))

    def _carry_epoch(self, refused: Sequence[Sighting], epoch: int) -> Tally:
        """Mark messages a round saw but did not overwrite (a newer version is stored) as seen in ``epoch``.

        Each sighting names the folder the refused write named. A newer stored
        version is normally a later delta page's, but it can be ahead of the
        provider: a user action's optimistic row (mailsync.actions.versions)
        stays above the provider's version when the provider had the value
        already. A resync that lists the message then writes an older version,
        is refused, and without the mark its ``remove_stale`` would delete a
        message the provider still has.

        The mark is a document of its own (:mod:`mailsync.store.seen_marks`),
        never an update of the message's: an update raises a document's
        external ``_version`` by one, after which the equal-version writes the
        version rule depends on were refused. It belongs to the refused
        write's folder, so it never keeps another folder's copy (a page of F
        read before its message moved to G saw it in F, not in G), and it
        only adds: a mark of an older epoch keeps nothing a newer resync did
        not see, and a message deleted meanwhile stays deleted.
        """
        return self._writer.send(self._marks.actions(refused, epoch), target="seen", what="mark seen")

    def write_notified(self, account_id: str, messages: Sequence[Message], *,
                       created: frozenset[str] = frozenset(), removed: Sequence[str] = ()) -> NotifiedWrite:
        """Write message states learnt from change notifications (one account's); say what was written.

        One realtime multi-get, one bulk request (:mod:`mailsync.store.notified_writes` says what may be
        written); the rule deciding the versions: ``mailsync.monitoring.notified_states``. ``removed``: ids
        whose notification said ``deleted``: nothing is written for them, but the same read tells the folder
        the store holds each in (``NotifiedWrite.removed``), for the page.
        """
        if not (messages or removed):
            return NotifiedWrite([], [])
        plan = self._notified.plan(account_id, messages, created, removed)
        if not plan.actions:
            return NotifiedWrite([], plan.removed, plan.announced, synced=plan.synced)
        sent = self._writer.send(plan.actions, target="messages", what="write_notified", originals=plan.originals)
        # Refused (a newer version came first), failed or still throttled: not written, so not told. Nothing
        # to retry: delta's round writes the same state or a newer one anyway.
        refused = {*sent.conflicts, *sent.failed, *sent.transient}
        return NotifiedWrite([plan.states[doc_id] for doc_id in plan.originals if doc_id not in refused],
                             plan.removed, plan.announced)

    def raise_epoch(self, account_id: str, folder_id: str, message_ids: Sequence[str], epoch: int) -> BulkResult:
        """Mark the messages as seen in ``epoch`` by ``folder_id``'s round (``_carry_epoch``'s mark).

        For a writer that learns of a newer epoch only after it wrote: a user
        action's row, written with an epoch read before a resync of its folder
        began (docs/actions.md). The message's document is not touched; a mark
        of a message gone or moved meanwhile keeps nothing.
        """
        docs.check_account_id(account_id)
        sightings = [Sighting(account_id, folder_id, m) for m in message_ids]
        return self._writer.finish(self._carry_epoch(sightings, epoch), "raise_epoch")

    def message_action(self, doc_id: str, message: Message, doc: dict[str, Any]) -> BulkAction:
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
        doc_ids = list(dict.fromkeys(docs.message_doc_id(account_id, m) for m in message_ids))

        def delete(doc_id: str, source: dict[str, Any]) -> tuple[str, dict[str, Any] | None] | None:
            if source.get("folder_id") != folder_id or source.get("account_id") != account_id:
                return None   # moved away: the destination folder owns it now
            return "delete", None

        tally = self._read_decide_write(account_id, doc_ids, ["account_id", "folder_id"], delete,
                                        what="remove_messages")
        return self._writer.finish(tally, "remove_messages")

    def _read_decide_write(self, account_id: str, doc_ids: Sequence[str], fields: Sequence[str],
                           decide: Callable[[str, dict[str, Any]], tuple[str, dict[str, Any] | None] | None], *,
                           what: str) -> Tally:
        """Read each document (realtime), let ``decide`` pick its write (or none), send them conditionally.

        ``decide`` gets the document's ``fields`` and answers ``(bulk op, body)``
        or None; the write carries the ``_seq_no`` / ``_primary_term`` read.
        A document written between the read and our write fails its
        condition (409): it is read and decided again, up to
        ``REMOVE_ROUNDS`` times; still racing after that, it counts as
        transient and the caller retries. Gone or decided against: skipped.
        """
        tally = Tally()
        pending = list(doc_ids)
        for _ in range(REMOVE_ROUNDS):
            if not pending:
                break
            actions: list[BulkAction] = []
            for doc_id, found in self._read_current(account_id, pending, fields, what):
                decided = None
                if found is not None:
                    source, seq_no, primary_term = found
                    decided = decide(doc_id, source)
                if decided is None:
                    tally.skipped += 1
                    continue
                op, body = decided
                actions.append(({op: {"_index": self.names.messages, "_id": doc_id, "routing": account_id,
                                      "if_seq_no": seq_no, "if_primary_term": primary_term}}, body))
            if not actions:
                pending = []
                break
            round_ = self._writer.send(actions, target="messages", what=what)
            tally.written += round_.written
            tally.skipped += round_.skipped
            tally.failed += round_.failed
            tally.dead += round_.dead
            tally.transient += round_.transient
            pending = round_.conflicts   # written since we read it: read again and decide again
        tally.transient += pending       # still racing after every round: let the caller retry
        return tally

    def _read_current(self, account_id: str, doc_ids: Sequence[str], fields: Sequence[str], what: str
                      ) -> Iterator[tuple[str, tuple[dict[str, Any], int, int] | None]]:
        """Each document's ``fields``, ``_seq_no`` and ``_primary_term`` (realtime), or None if it is gone."""
        with translating(what):
            for start in range(0, len(doc_ids), 1_000):
                chunk = list(doc_ids[start:start + 1_000])
                try:
                    entries = self._engine.mget(self.names.messages, chunk, routing=account_id,
                                                source_includes=list(fields))
                except EngineError as exc:
                    if exc.index_missing:
                        raise StoreUnavailable(f"{what}: messages index missing", retry_after_s=5.0) from exc
                    raise
                for entry in entries:
                    doc_id = str(entry.get("_id"))
                    if "error" in entry:
                        # Answered per document (a failed shard, an index lost since): "gone" would skip a
                        # removal for good, so the caller retries instead.
                        error_type, reason = error_parts(entry)
                        raise StoreUnavailable(f"{what}: {error_type} {short_reason(reason)}".strip(),
                                               retry_after_s=5.0)
                    if not entry.get("found"):
                        yield doc_id, None
                    else:
                        yield doc_id, (entry.get("_source") or {}, int(entry["_seq_no"]), int(entry["_primary_term"]))

    def remove_stale(self, account_id: str, folder_id: str, epoch: int) -> int:
        """Delete the folder's messages the round of ``epoch`` did not see; return how many.

        Not seen: written with a ``sync_epoch`` below ``epoch`` and without a
        seen mark of this folder at ``epoch`` or above (``_carry_epoch``). The
        folder's older marks are dropped afterwards: epochs only grow, so no
        later round can use them.
        """
        docs.check_account_id(account_id)
        seen, older_marks = self._marks.of_folder(account_id, folder_id, epoch)
        removed = self._delete_by_query(self.names.messages, account_id, [
            {"term": {"folder_id": folder_id}},
            {"range": {"sync_epoch": {"lt": epoch}}},
        ], "remove_stale", must_not=self._marks.keep(seen))
        if older_marks:
            self._delete_by_query(self.names.seen, account_id, self._marks.older_than(folder_id, epoch),
                                  "remove_stale (older marks)")
        return removed

    def _delete_by_query(self, index: str, account_id: str, filters: list[dict[str, Any]], what: str, *,
                         must_not: list[dict[str, Any]] | None = None) -> int:
        query: dict[str, Any] = {"bool": {"filter": [{"term": {"account_id": account_id}}, *filters]}}
        if must_not:
            query["bool"]["must_not"] = must_not
        with translating(what):
            try:
                # delete_by_query sees only refreshed documents.
                self._engine.refresh([index])
                answer = self._engine.delete_by_query(index, query, routing=account_id,
                                                      timeout_s=self.options.long_request_timeout_s)
            except EngineError as exc:
                if exc.index_missing:
                    return 0
                raise
        failures = answer.get("failures") or []
        if failures:
            raise StoreUnavailable(f"{what}: {len(failures)} deletion(s) failed; retry", retry_after_s=5.0)
        return int(answer.get("deleted", 0))

    # ------------------------------------------------------------------ mailboxes writes

    def upsert_folders(self, folders: Sequence[Folder], *, phase: str | None = None) -> None:
        """Create or update folder documents; ``phase`` (when given) is set on each, else kept."""
        actions: list[BulkAction] = []
        originals: dict[str, dict[str, Any]] = {}
        updated_at = docs.now_iso()
        for folder in folders:
            doc = docs.folder_to_document(folder, phase=phase, updated_at=updated_at)
            doc_id = docs.folder_doc_id(folder.account_id, folder.folder_id)
            originals[doc_id] = doc
            actions.append(({"update": {"_index": self.names.mailboxes, "_id": doc_id, "routing": folder.account_id,
                                        "retry_on_conflict": 3}}, {"doc": doc, "doc_as_upsert": True}))
        if actions:
            tally = self._writer.send(actions, target="mailboxes", what="upsert_folders", originals=originals)
            tally.transient += tally.conflicts
            self._writer.finish(tally, "upsert_folders")

    def set_folder_phase(self, account_id: str, folder_id: str, phase: str) -> bool:
        """Set the sync phase of an existing folder document; False (nothing written) when it is gone.

        Only ``phase`` changes: name and parent belong to the folder list,
        which may have renamed or moved the folder while its round ran. No
        upsert either, so a folder removed meanwhile is not brought back.
        """
        doc_id = docs.folder_doc_id(account_id, folder_id)
        with translating("set_folder_phase"):
            try:
                return self._engine.update_document(self.names.mailboxes, doc_id, routing=account_id,
                                                    doc={"phase": phase, "updated_at": docs.now_iso()})
            except EngineError as exc:
                if exc.index_missing:
                    # Like a bulk write: never auto-create the index; the generation check resyncs.
                    raise StoreUnavailable("set_folder_phase: the mailboxes index is missing",
                                           retry_after_s=5.0) from exc
                raise

    def set_folder_phases(self, account_id: str, folder_ids: Sequence[str], phase: str) -> None:
        """``set_folder_phase`` for several folders of one account in one bulk request.

        Partial updates without upsert, as ``set_folder_phase``: a folder
        document gone meanwhile stays gone (its item is skipped).
        """
        docs.check_account_id(account_id)
        updated_at = docs.now_iso()
        actions: list[BulkAction] = [
            ({"update": {"_index": self.names.mailboxes, "_id": docs.folder_doc_id(account_id, folder_id),
                         "routing": account_id, "retry_on_conflict": 3}},
             {"doc": {"phase": phase, "updated_at": updated_at}})
            for folder_id in dict.fromkeys(folder_ids)]
        if actions:
            tally = self._writer.send(actions, target="mailboxes", what="set_folder_phases")
            tally.transient += tally.conflicts
            self._writer.finish(tally, "set_folder_phases")

    def remove_folder(self, account_id: str, folder_id: str) -> None:
        """Delete a folder document and every message still in it."""
        doc_id = docs.folder_doc_id(account_id, folder_id)
        with translating("remove_folder"):
            self._engine.delete_document(self.names.mailboxes, doc_id, routing=account_id)
        self._delete_by_query(self.names.messages, account_id, [{"term": {"folder_id": folder_id}}],
                              "remove_folder")
        self._delete_by_query(self.names.seen, account_id, [{"term": {"folder_id": folder_id}}],
                              "remove_folder (marks)")

    def upsert_mailbox(self, mailbox: Mailbox) -> None:
        """Create or replace the account's mailbox document."""
        doc = docs.mailbox_to_document(mailbox)
        with translating("upsert_mailbox"):
            self._engine.index_document(self.names.mailboxes, docs.mailbox_doc_id(mailbox.account_id),
                                        routing=mailbox.account_id, document=doc)

    def delete_account(self, account_id: str) -> None:
        """Delete every document of the account: messages, mailbox and folders, leases, dead letters, actions,
        seen marks."""
        docs.check_account_id(account_id)
        # The mailbox document first: a writer that checked it before its write and checks it again after
        # (``write_notified``'s caller) then either wrote before the messages' deletion, which takes its
        # write, or sees the mailbox gone afterwards and takes its write back itself.
        for index in (self.names.mailboxes, self.names.messages, self.names.deadletter, self.names.actions,
                      self.names.seen):
            self._delete_by_query(index, account_id, [], "delete_account")

    def forget_notified(self, account_id: str, message_ids: Sequence[str]) -> None:
        """Delete messages ``write_notified`` wrote for an account that was unlinked meanwhile (one bulk)."""
        actions = self._notified.forget(account_id, message_ids)
        if actions:
            self._writer.finish(self._writer.send(actions, target="messages", what="forget_notified"),
                                "forget_notified")

    # ------------------------------------------------------------------ reads (mailsync.store.reads)

    def list_messages(self, account_id: str, query: MessageQuery) -> MessagePage:
        """One page of the account's messages, newest first, with the next page's cursor."""
        return self._reads.list_messages(account_id, query)

    def get_messages(self, account_id: str, message_ids: Sequence[str]) -> dict[str, Message]:
        """The account's messages among ``message_ids`` (whole, as ``get_message``), by id."""
        return self._reads.get_messages(account_id, message_ids)

    def get_message(self, account_id: str, message_id: str) -> Message | None:
        """One message of the account with its body text, or None (also for another account's id)."""
        return self._reads.get_message(account_id, message_id)

    def get_mailbox(self, account_id: str) -> Mailbox | None:
        """The account's mailbox document, or None."""
        return self._reads.get_mailbox(account_id)

    def list_folders(self, account_id: str) -> list[FolderView]:
        """The account's folders with the stored message and unread counts (one aggregation)."""
        return self._reads.list_folders(account_id)

    def dead_letters(self, account_id: str, *, limit: int = 100) -> list[DeadLetter]:
        """The account's refused writes, newest first (operations and tests)."""
        return self._reads.dead_letters(account_id, limit=limit)


class _IndicesMissing(Exception):
    """Internal: an alias the store needs does not exist."""



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
    def _implements_port(store: SearchStore) -> MessageStore:
        return store
