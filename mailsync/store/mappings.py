"""Index names, aliases and explicit mappings of the search store.

Five index families, all shared by every account (see docs/store.md for
why not one index per user):

=====================  ==========================  ==================================
alias (what we use)     physical index               holds
=====================  ==========================  ==================================
<prefix>-messages       <prefix>-messages-v1         one document per message
<prefix>-mailboxes      <prefix>-mailboxes-v1        one per linked address, one per folder
<prefix>-deadletter     <prefix>-deadletter-v1       writes the cluster refused, with reason
<prefix>-actions        <prefix>-actions-v1          per message, the latest user action on each field
<prefix>-seen           <prefix>-seen-v1             "a folder's round of epoch E saw this message" marks
=====================  ==========================  ==================================

The code only ever names the alias; the ``-vN`` index behind it can be
replaced by a reindex into ``-vN+1`` and an atomic alias swap when a
mapping has to change in a way Elasticsearch cannot apply in place.

Every mapping is ``dynamic: strict`` (a field we did not declare is an
error, not a silent new field) and requires ``_routing`` (a write or get
without the account id as routing is an error, so a forgotten routing
cannot scatter an account over every shard). The generation id is written
into the ``_meta`` of the messages and mailboxes mappings at creation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mailsync.errors import ConfigurationError

SCHEMA_VERSION = 1

# Keyword values longer than this are kept in _source but not indexed:
# Elasticsearch refuses a whole document with a term over 32766 bytes, and
# a spam header should not dead-letter a message.
KEYWORD_IGNORE_ABOVE = 1024
# Lucene's limit for one indexed term, in UTF-8 bytes. Id keywords (no
# ignore_above) longer than this would be refused by the engine; the store
# refuses them itself first (documents.check_message), the same on every engine.
MAX_TERM_BYTES = 32_766

# Index names: lowercase, no separators Elasticsearch forbids, and room for
# the "-messages-v1" suffix under the 255-byte limit.
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class IndexNames:
    """Alias and physical index names for one index prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigurationError(
                "ELASTICSEARCH_INDEX_PREFIX must be lowercase letters, digits, '.', '_' or '-' "
                f"and start with a letter or digit, got {self.prefix!r}"
            )

    @property
    def messages(self) -> str:
        return f"{self.prefix}-messages"

    @property
    def messages_index(self) -> str:
        return f"{self.messages}-v{SCHEMA_VERSION}"

    @property
    def mailboxes(self) -> str:
        return f"{self.prefix}-mailboxes"

    @property
    def mailboxes_index(self) -> str:
        return f"{self.mailboxes}-v{SCHEMA_VERSION}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}-deadletter"

    @property
    def deadletter_index(self) -> str:
        return f"{self.deadletter}-v{SCHEMA_VERSION}"

    @property
    def actions(self) -> str:
        return f"{self.prefix}-actions"

    @property
    def actions_index(self) -> str:
        return f"{self.actions}-v{SCHEMA_VERSION}"

    @property
    def seen(self) -> str:
        return f"{self.prefix}-seen"

    @property
    def seen_index(self) -> str:
        return f"{self.seen}-v{SCHEMA_VERSION}"

    @property
    def physical_indices(self) -> list[str]:
        """Every family's physical index (what a test or a benchmark deletes when it is done)."""
        return [self.messages_index, self.mailboxes_index, self.deadletter_index, self.actions_index,
                self.seen_index]


def _keyword(**extra: Any) -> dict[str, Any]:
    return {"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE, **extra}


# Ids are keywords without ignore_above: an id too long to index must fail
# loudly (dead letter), never be stored unfindable.
_ID: dict[str, Any] = {"type": "keyword"}
_DATE: dict[str, Any] = {"type": "date", "format": "strict_date_optional_time||epoch_millis"}
# A message's full text: searched (simple_query_string; positions kept for its quoted phrases), never
# ranked: every read of messages sorts by sort_ts, so no score is computed and the length norms a text
# field writes by default (one per field and document) were indexing work for nothing. Without them the
# node spent ~10-20 % less CPU per document on the bench mailbox's records (bench/README.md). An index
# created with norms keeps them: the same searches, the same answers.
_TEXT: dict[str, Any] = {"type": "text", "norms": False}
_ADDRESS: dict[str, Any] = {
    "properties": {
        "name": _TEXT,
        # Exact address as keyword (filters), and a copy split at every
        # non-letter for full text, so "fabrikam" finds billing@fabrikam.com.
        "address": _keyword(fields={"text": {**_TEXT, "analyzer": "simple"}}),
    }
}
# Kept in _source and returned, but neither indexed nor given doc values: nothing searches,
# filters, sorts or aggregates on these (the reads are search_store's list_messages,
# list_folders, remove_stale). Each indexed field was CPU on every write of every message:
# on the bench mailbox's records, with these unindexed, the node spent ~25-30 % less CPU per
# document (bench/README.md). Searching one later means indexing it again: a new mapping
# (SCHEMA_VERSION) and a reindex, as docs/store.md describes.
_STORED_ONLY: dict[str, Any] = {"type": "keyword", "index": False, "doc_values": False}
# Times kept only in _source are keywords, not dates: a date field parses every value with java.time
# even when it is neither indexed nor given doc values, and that parse was ~10 % of the node's CPU
# during an initial sync (a profile of bench/imap_initial_sync.py; four such times per message). The
# store writes them itself (documents.iso_time) and reads them back from _source, so nothing else
# changes; an index created when they were dates keeps that type and takes the same strings.
_TIME_STORED_ONLY: dict[str, Any] = _STORED_ONLY
# Recipient lists: not even parsed (any shape is kept in _source as it came).
_UNPARSED: dict[str, Any] = {"type": "object", "enabled": False}


def messages_mapping(generation: str) -> dict[str, Any]:
    """Mapping of the messages index; ``generation`` goes into ``_meta``.

    Indexed: what the store's reads use (``account_id``, ``folder_id``,
    ``is_read``, ``flag_status``, ``sync_epoch``, ``sort_ts`` and
    ``message_id`` for the list order) and the full-text fields of a search
    (``subject``, ``from``, ``body_preview``, ``body_text``). The rest is
    stored only (``_STORED_ONLY``).
    """
    return {
        "dynamic": "strict",
        "_routing": {"required": True},
        "_meta": {"family": "messages", "schema": SCHEMA_VERSION, "generation": generation},
        "properties": {
            "account_id": _ID,
            "message_id": _ID,
            "folder_id": _ID,
            # The provider version (also the external _version, which is what the engine
            # compares) and the resync epoch of the last write; remove_stale compares sync_epoch.
            "version": {"type": "long", "index": False, "doc_values": False},
            "sync_epoch": {"type": "long"},
            # Sort key: received time in epoch ms, never missing (falls back
            # to sent/modified time, then 0) so search_after cursors never
            # carry a null, which servers treat differently.
            "sort_ts": {"type": "long"},
            "subject": _TEXT,
            "from": _ADDRESS,
            "to": _UNPARSED,
            "cc": _UNPARSED,
            "received_at": _TIME_STORED_ONLY,
            "sent_at": _TIME_STORED_ONLY,
            "modified_at": _TIME_STORED_ONLY,
            "is_read": {"type": "boolean"},
            "is_draft": {"type": "boolean", "index": False, "doc_values": False},
            "flag_status": _keyword(),
            "importance": _STORED_ONLY,
            "categories": _STORED_ONLY,
            "has_attachments": {"type": "boolean", "index": False, "doc_values": False},
            "conversation_id": _STORED_ONLY,
            "internet_message_id": _STORED_ONLY,
            "body_preview": _TEXT,
            "body_text": _TEXT,
            "indexed_at": _TIME_STORED_ONLY,
        },
    }


def mailboxes_mapping(generation: str) -> dict[str, Any]:
    """Mapping of the mailboxes index: ``kind`` tells a mailbox, folder or bulk-load lease apart."""
    return {
        "dynamic": "strict",
        "_routing": {"required": True},
        "_meta": {"family": "mailboxes", "schema": SCHEMA_VERSION, "generation": generation},
        "properties": {
            "kind": _ID,
            "account_id": _ID,
            # kind=mailbox
            "address": _keyword(fields={"text": {"type": "text"}}),
            "display_name": {"type": "text"},
            "provider": _keyword(),
            "status": _keyword(),
            "total_messages": {"type": "long"},
            "last_sync_at": _DATE,
            # kind=folder
            "folder_id": _ID,
            "name": {"type": "text", "fields": {"keyword": _keyword()}},
            "parent_id": _ID,
            "role": _keyword(),
            "total_count": {"type": "long"},
            "unread_count": {"type": "long"},
            "child_folder_count": {"type": "long"},
            "phase": _keyword(),
            # kind=bulk_load
            "expires_at": _DATE,
            "updated_at": _DATE,
        },
    }


def deadletter_mapping() -> dict[str, Any]:
    """Mapping of the dead-letter index: the refused document is kept whole but not indexed."""
    return {
        "dynamic": "strict",
        "_routing": {"required": True},
        "_meta": {"family": "deadletter", "schema": SCHEMA_VERSION},
        "properties": {
            "account_id": _ID,
            "doc_id": _ID,
            "target": _ID,          # messages | mailboxes
            "action": _ID,          # index | update | delete
            "status": {"type": "integer"},
            "error_type": _keyword(),
            "reason": {"type": "text"},
            "recorded_at": _DATE,
            # Whatever we tried to write, as is: "enabled: false" accepts any
            # shape without mapping it, which is the point for a poison document.
            "document": {"type": "object", "enabled": False},
        },
    }


def index_settings(*, shards: int = 1, replicas: int | None = None) -> dict[str, Any]:
    """Settings for a new index. One shard by default: routing keeps each account on one shard anyway."""
    settings: dict[str, Any] = {"number_of_shards": shards}
    if replicas is not None:
        settings["number_of_replicas"] = replicas
    return settings


def actions_mapping() -> dict[str, Any]:
    """Mapping of the action ledger: per message, the latest user action on each field (docs/actions.md).

    Not part of the generation: a lost ledger only means jobs already
    queued are checked against nothing (as before the ledger existed).
    """
    return {
        "dynamic": "strict",
        "_routing": {"required": True},
        "_meta": {"family": "actions", "schema": SCHEMA_VERSION},
        "properties": {
            "account_id": _ID,
            "message_id": _ID,
            "seq": {"type": "long"},
            "read_seq": {"type": "long"},
            "read": {"type": "boolean"},
            "flag_seq": {"type": "long"},
            "flag": _keyword(),
            "place_seq": {"type": "long"},
            "place": _ID,
            "updated_at": _DATE,
            # A bulk action's list, too large for one queue message (docs/actions.md): kept, not indexed.
            "batch": {"type": "object", "enabled": False},
        },
    }


def seen_mapping() -> dict[str, Any]:
    """Mapping of the seen marks: a folder's round of ``sync_epoch`` saw ``message_id`` (docs/store.md).

    Not part of the generation. Kept apart from the message so that marking
    one never writes the message's document (which would raise its version:
    ``mailsync.store.seen_marks``).
    """
    return {
        "dynamic": "strict",
        "_routing": {"required": True},
        "_meta": {"family": "seen", "schema": SCHEMA_VERSION},
        "properties": {
            "account_id": _ID,
            "folder_id": _ID,
            "message_id": _ID,
            "sync_epoch": {"type": "long"},
        },
    }
