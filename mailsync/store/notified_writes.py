"""Notified writes: the store's part of writing message states learnt from change notifications.

The rules deciding what may be written and at which version live in
``mailsync.monitoring.notified_states``; here is what the store does for one
notification POST (one account's states), in two requests:

1. **One realtime multi-get across two indices**: the account's mailbox
   document (is its initial sync done?), the documents of the states'
   folders (does the store have them?) and the stored documents of the
   messages (their versions, bodies and resync epochs). They were two
   multi-gets, one per index, on the webhook's hot path (docs/scaling.md).
2. **One bulk request** writing each state the store may take, at the
   message's own version with ``external_gte`` like a round's write, so a
   version stored between the read and the write still refuses it.

A written document keeps the stored one's ``body_text`` (a notification
carries no body) and ``sync_epoch`` (a resync's ``remove_stale`` must not
take it for unseen). Nothing here is a partial update: an update raises a
document's external version by one (``mailsync.store.seen_marks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mailsync.errors import InputError
from mailsync.models import Message
from mailsync.store import documents as docs
from mailsync.store.bulk_writer import BulkAction
from mailsync.store.documents import BodyPolicy
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engine_errors import translating
from mailsync.store.mappings import IndexNames


@dataclass(frozen=True)
class NotifiedWrite:
    """What ``SearchStore.write_notified`` did: the states written, and where the deleted ones are held."""

    written: list[Message]
    removed: list[tuple[str, str]]    # (folder_id, message_id) as the store holds them; nothing was written
    announced: list[Message] = field(default_factory=list)   # created, not held: for the page only
    synced: bool = True               # False: the account's initial sync is not done (or no mailbox): nothing read


@dataclass(frozen=True)
class NotifiedPlan:
    """The bulk actions a POST's states make, with what the page may be told whatever the write does."""

    actions: list[BulkAction]
    originals: dict[str, dict[str, Any]]      # document id -> the document written (dead letters)
    states: dict[str, Message]                # document id -> its state
    removed: list[tuple[str, str]]
    announced: list[Message]
    synced: bool


class NotifiedWrites:
    """Reads what a POST's states need and plans their writes; the store sends them (its bulk writer)."""

    def __init__(self, engine: SearchEngine, names: IndexNames, body: BodyPolicy | None) -> None:
        self._engine = engine
        self._names = names
        self._body = body

    def plan(self, account_id: str, messages: Sequence[Message], created: frozenset[str],
             removed: Sequence[str]) -> NotifiedPlan:
        """The writes ``messages`` (states of ``account_id``'s messages) make, after one realtime multi-get.

        Written only when the account's mailbox document says ``synced``, into a folder the store has, over
        an older stored version of a message the store holds. ``created`` ids the store does not hold are
        ``announced`` (the page may show them; the round writes them). ``removed`` (notified ``deleted``):
        nothing written, the folder each is held in returned for the page.
        """
        docs.check_account_id(account_id)
        mailbox = docs.mailbox_doc_id(account_id)
        folder_docs = {docs.folder_doc_id(account_id, m.folder_id): m.folder_id for m in messages}
        by_doc = {docs.message_doc_id(account_id, m.message_id): m for m in messages if m.account_id == account_id}
        gone = {docs.message_doc_id(account_id, m): m for m in removed}
        wanted = [(self._names.mailboxes, mailbox), *((self._names.mailboxes, d) for d in folder_docs),
                  *((self._names.messages, d) for d in dict.fromkeys([*by_doc, *gone]))]
        with translating("write_notified"):
            try:
                # The whole sources: a source filter costs the node more than it spares (SearchEngine.mget).
                entries = self._engine.mget_docs(wanted, routing=account_id)
            except EngineError as exc:
                if exc.index_missing:
                    return NotifiedPlan([], {}, {}, [], [], synced=False)
                raise
        synced, folders, stored = False, set[str](), dict[str, dict[str, Any] | None]()
        for (index, doc_id), entry in zip(wanted, entries, strict=True):
            if "error" in entry:
                continue                      # unreadable: left to delta
            source = entry.get("_source") or {}
            if index == self._names.messages:
                stored[doc_id] = entry if entry.get("found") else None
            elif not entry.get("found") or source.get("account_id") != account_id:
                continue
            elif doc_id == mailbox:
                synced = source.get("kind") == docs.KIND_MAILBOX and source.get("status") == "synced"
            elif source.get("kind") == docs.KIND_FOLDER:
                folders.add(folder_docs[doc_id])
        if not synced:
            return NotifiedPlan([], {}, {}, [], [], synced=False)
        held_in = [(str(folder), gone[doc_id]) for doc_id in gone if (found := stored.get(doc_id)) is not None
                   and isinstance(folder := (found.get("_source") or {}).get("folder_id"), str)]
        actions: list[BulkAction] = []
        originals: dict[str, dict[str, Any]] = {}
        announced: list[Message] = []
        indexed_at = docs.now_iso()
        for doc_id, message in by_doc.items():
            if message.folder_id not in folders or doc_id not in stored:
                continue                      # a folder the rounds do not sync (or not yet), or unreadable
            found = stored[doc_id]
            if found is None:
                # Not held: never written from a notification. New mail is delta's to bring in (its round
                # follows within seconds); the page may be told of it (``announced``). A copy written here
                # could outlive the message: a ``created`` Graph delivers after the message's deletion,
                # which a round already read, would leave a row no delta round ever removes.
                if message.message_id in created:
                    announced.append(message)
                continue
            source = found.get("_source") or {}
            if int(found.get("_version") or source.get("version") or 0) > message.version:
                continue                      # newer there already (delta's reading, an action's row); an equal
                                              # one is another notified state of the second: the later shows
            epoch, body = int(source.get("sync_epoch") or 0), source.get("body_text")
            try:
                docs.check_message(message)
                doc = docs.message_to_document(message, epoch=epoch, body=self._body, indexed_at=indexed_at)
            except InputError:
                continue                      # not a state Graph sends: left to delta
            if isinstance(body, str):
                doc["body_text"] = body
            originals[doc_id] = doc
            actions.append(({"index": {"_index": self._names.messages, "_id": doc_id, "routing": account_id,
                                       "version": message.version, "version_type": "external_gte"}}, doc))
        return NotifiedPlan(actions, originals, by_doc, held_in, announced, synced=True)

    def forget(self, account_id: str, message_ids: Sequence[str]) -> list[BulkAction]:
        """The deletions taking back what was written for an account unlinked meanwhile."""
        docs.check_account_id(account_id)
        return [({"delete": {"_index": self._names.messages, "_id": docs.message_doc_id(account_id, m),
                             "routing": account_id}}, None) for m in dict.fromkeys(message_ids)]
