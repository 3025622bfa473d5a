"""The seam between the search store's logic and a search engine's client.

:class:`mailsync.store.search_store.SearchStore` holds every rule of the
store (mappings, versions, conditional removals, routing, reads, bulk
chunking and retries) and speaks to the cluster only through
:class:`SearchEngine`: the dozen REST calls it makes, with plain dicts in
and out. Each engine is one small module under ``mailsync/store/engines/``
that builds its official client and maps these calls onto it; a third
engine is one more such module (and one line in
:func:`mailsync.store.engines.connect`).

The engines differ only in the client: how it is built (authentication,
content types, the product check of the ``elasticsearch`` client), how
each call passes its body (``operations=``/``document=``/``query=`` keyword
arguments vs. ``body=``), and the exception classes. The REST API the
store uses — ``_bulk`` with ``require_alias``, ``external_gte`` versions,
``if_seq_no``/``if_primary_term``, ``_mget`` with ``_seq_no``,
``_delete_by_query``, aliases, ``_meta`` — is the same on Elasticsearch
8/9 and OpenSearch 2/3.

An engine raises :class:`EngineError` for any answer that is not a
success, and for no answer at all (``status`` 0: refused connection,
timeout). The store translates it into the project's errors
(``StoreError``/``StoreUnavailable``) at its boundary; it never leaves
``mailsync.store``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

# EngineError.status when no answer came at all (connection refused or reset, timeout, TLS failure).
NO_ANSWER = 0
# What ``get_indices`` returns of each physical index (its ``filter_path``).
INDEX_IDENTITY_PATHS = ("*.mappings._meta", "*.settings.index.uuid")


class EngineError(Exception):
    """The engine answered with an error, or did not answer (``status`` 0).

    ``error_type`` and ``reason`` are the cluster's ``error.type`` and
    ``error.reason`` when it sent them (``index_not_found_exception``,
    ``resource_already_exists_exception``, ...).
    """

    def __init__(self, status: int, error_type: str = "", reason: str = "") -> None:
        super().__init__(f"{status} {error_type} {reason}".strip())
        self.status = status
        self.error_type = error_type
        self.reason = reason

    @property
    def answered(self) -> bool:
        return self.status != NO_ANSWER

    @property
    def index_missing(self) -> bool:
        return self.status == 404 and self.error_type == "index_not_found_exception"

    @classmethod
    def from_body(cls, status: int, body: Any, fallback: str = "") -> EngineError:
        """From an error answer's JSON body (``{"error": {"type", "reason"}, "status"}``) or its text."""
        if isinstance(body, Mapping):
            error = body.get("error")
            if isinstance(error, Mapping):
                return cls(status, str(error.get("type", "")), str(error.get("reason", "")))
            if error is not None:
                return cls(status, "", str(error))
        return cls(status, "", fallback or (str(body) if body else ""))


class SearchEngine(Protocol):
    """The calls the store makes. Bodies and answers are the REST API's JSON, as dicts.

    Every write that names an index names an *alias*; every document call
    takes the account id as ``routing``.
    """

    #: ``"elasticsearch"`` or ``"opensearch"`` (what ``GET /`` said, or what the settings chose).
    name: str

    def info(self) -> dict[str, Any]:
        """``GET /``: name, cluster, version."""

    def close(self) -> None:
        """Release the client's connections."""

    # -- indices and aliases

    def alias_exists(self, name: str) -> bool: ...

    def index_exists(self, name: str) -> bool: ...

    def create_index(self, index: str, *, mappings: Mapping[str, Any] | None = None,
                     settings: Mapping[str, Any] | None = None,
                     aliases: Mapping[str, Any] | None = None) -> None:
        """``PUT /<index>``; EngineError ``resource_already_exists_exception`` if it exists."""

    def delete_indices(self, names: Sequence[str]) -> None:
        """``DELETE /<names>``; names that do not exist are ignored."""

    def put_alias(self, index: str, name: str) -> None: ...

    def get_indices(self, names: Sequence[str]) -> dict[str, Any]:
        """``GET /<names>``, per physical index only ``mappings._meta`` and ``settings.index.uuid``
        (``filter_path``: the whole mappings were most of what a sync invocation parsed to learn the
        store's generation); 404 if one is missing."""

    def get_settings(self, index: str) -> dict[str, Any]:
        """``GET /<index>/_settings`` per physical index."""

    def put_settings(self, index: str, settings: Mapping[str, Any]) -> None:
        """``PUT /<index>/_settings`` (a None value resets a setting to its default)."""

    def refresh(self, indices: Sequence[str]) -> None: ...

    # -- documents

    def bulk(self, body: bytes) -> dict[str, Any]:
        """``POST /_bulk?require_alias=true`` with a ready NDJSON body; the answer with its ``items``."""

    def index_document(self, index: str, doc_id: str, *, routing: str, document: Mapping[str, Any],
                       refresh: bool = False) -> None:
        """``PUT /<index>/_doc/<id>?require_alias=true``."""

    def update_document(self, index: str, doc_id: str, *, routing: str, doc: Mapping[str, Any]) -> bool:
        """Partial update of an existing document (``require_alias``, 3 retries on conflict); False if missing.

        A missing *index* is an EngineError ``index_not_found_exception``, never a False.
        """

    def get_document(self, index: str, doc_id: str, *, routing: str) -> dict[str, Any] | None:
        """The document's ``_source``, or None if there is none (a missing index too)."""

    def delete_document(self, index: str, doc_id: str, *, routing: str, refresh: bool = False) -> bool:
        """True if it existed."""

    def mget(self, index: str, ids: Sequence[str], *, routing: str,
             source_includes: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Realtime multi-get: one entry per id (``found``, ``_seq_no``, ``_primary_term``, ``_source``).

        ``source_includes``: only those fields of ``_source``; empty, the whole of it. Filtering is not free:
        the node filters each document's source on its own, and a multi-get of 500 small ledger entries took
        0.5-0.8 s with nine fields named, 0.2-0.3 s with ``*`` and 40-90 ms with no filter (OpenSearch 2, load
        ~25). Name fields only where they spare a large source."""

    def mget_docs(self, docs: Sequence[tuple[str, str]], *, routing: str) -> list[dict[str, Any]]:
        """Realtime multi-get of ``(index, id)`` pairs across indices, one routing: one entry per pair, in order
        (``found``, ``_version``, ``_source``, or ``error``: the entry of a missing index, the others still read)."""

    def search(self, index: str, body: Mapping[str, Any], *, routing: str | None = None) -> dict[str, Any]:
        """``POST /<index>/_search`` (routed when ``routing`` is given)."""

    def count(self, index: str, query: Mapping[str, Any]) -> int: ...

    def delete_by_query(self, index: str, query: Mapping[str, Any], *, routing: str | None,
                        timeout_s: float) -> dict[str, Any]:
        """Waits for completion, ``conflicts=proceed``, refreshes the index afterwards. ``routing`` None: every
        shard (a sweep over all accounts)."""
