"""Elasticsearch 8/9 through the official ``elasticsearch`` client.

The only module that imports ``elasticsearch`` and ``elastic_transport``.

Two quirks of the client shape it:

* It always sends Elasticsearch's versioned vendor types
  (``application/vnd.elasticsearch+json; compatible-with=9``).
  :class:`PlainJsonTransport` (``ELASTICSEARCH_PLAIN_JSON``, default on)
  rewrites them to plain ``application/json`` / ``application/x-ndjson``,
  which Elasticsearch 8 and 9 accept too, so a proxy or gateway that only
  knows plain JSON is no problem.
* It refuses any server whose answers lack ``X-Elastic-Product:
  Elasticsearch``. OpenSearch does not send it, which is why OpenSearch
  has a module of its own (``opensearch.py``) rather than this client with
  the check patched out.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from elastic_transport import SerializationError, Transport, TransportError
from elastic_transport import TransportApiResponse as _TransportApiResponse
from elasticsearch import ApiError, Elasticsearch, NotFoundError
from elasticsearch.serializer import OrjsonSerializer

from mailsync.errors import StoreError
from mailsync.store.engine import INDEX_IDENTITY_PATHS, NO_ANSWER, EngineError

if TYPE_CHECKING:
    from mailsync.store.engine import SearchEngine

# Sent by the client as application/vnd.elasticsearch+json; compatible-with=9.
_COMPAT_RE = re.compile(r"application/vnd\.elasticsearch\+([a-z0-9.\-]+)(\s*;\s*compatible-with=\d+)?")


class PlainJsonTransport(Transport):
    """A Transport that sends plain ``application/json`` and ``application/x-ndjson``."""

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


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The client's exceptions as EngineError (answers and missing answers) or StoreError (our bug)."""
    try:
        yield
    except ApiError as exc:
        raise EngineError.from_body(exc.status_code, exc.body, str(exc.message)) from exc
    except SerializationError as exc:
        raise StoreError(f"cannot encode or decode a store request: {exc}") from exc
    except TransportError as exc:   # connection refused or reset, timeout, TLS
        raise EngineError(NO_ANSWER, type(exc).__name__, str(exc)) from exc


class ElasticsearchEngine:
    """:class:`mailsync.store.engine.SearchEngine` on the ``elasticsearch`` client."""

    name = "elasticsearch"

    def __init__(self, client: Elasticsearch) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None, plain_json: bool = True,
                request_timeout_s: float = 30.0) -> ElasticsearchEngine:
        return cls(Elasticsearch(
            url,
            api_key=api_key,
            transport_class=PlainJsonTransport if plain_json else Transport,
            # orjson, not the stdlib: bulk answers carry one item per message, and bench/pipeline.py
            # measured the stdlib at ~14 us per message (orjson ~2).
            serializers={"application/json": OrjsonSerializer()},
            request_timeout=request_timeout_s,
            max_retries=2,
            retry_on_timeout=True,
        ))

    def info(self) -> dict[str, Any]:
        with _errors():
            return dict(self.client.info().body)

    def close(self) -> None:
        self.client.close()

    def alias_exists(self, name: str) -> bool:
        with _errors():
            return bool(self.client.indices.exists_alias(name=name))

    def index_exists(self, name: str) -> bool:
        with _errors():
            return bool(self.client.indices.exists(index=name))

    def create_index(self, index: str, *, mappings: Mapping[str, Any] | None = None,
                     settings: Mapping[str, Any] | None = None, aliases: Mapping[str, Any] | None = None) -> None:
        with _errors():
            self.client.indices.create(index=index, mappings=mappings, settings=settings, aliases=aliases)

    def delete_indices(self, names: Sequence[str]) -> None:
        with _errors():
            self.client.options(ignore_status=404).indices.delete(index=list(names), ignore_unavailable=True)

    def put_alias(self, index: str, name: str) -> None:
        with _errors():
            self.client.indices.put_alias(index=index, name=name)

    def get_indices(self, names: Sequence[str]) -> dict[str, Any]:
        with _errors():
            return dict(self.client.indices.get(index=list(names), filter_path=list(INDEX_IDENTITY_PATHS)).body)

    def get_settings(self, index: str) -> dict[str, Any]:
        with _errors():
            return dict(self.client.indices.get_settings(index=index).body)

    def put_settings(self, index: str, settings: Mapping[str, Any]) -> None:
        with _errors():
            self.client.indices.put_settings(index=index, settings=settings)

    def refresh(self, indices: Sequence[str]) -> None:
        with _errors():
            self.client.indices.refresh(index=list(indices))

    def bulk(self, body: bytes) -> dict[str, Any]:
        with _errors():
            # Ready NDJSON: the client passes bytes through as they are (its stubs only know lists).
            return dict(self.client.bulk(operations=body, require_alias=True).body)  # type: ignore[arg-type]

    def index_document(self, index: str, doc_id: str, *, routing: str, document: Mapping[str, Any],
                       refresh: bool = False) -> None:
        with _errors():
            self.client.index(index=index, id=doc_id, routing=routing, document=document, refresh=refresh,
                              require_alias=True)

    def update_document(self, index: str, doc_id: str, *, routing: str, doc: Mapping[str, Any]) -> bool:
        with _errors():
            try:
                self.client.update(index=index, id=doc_id, routing=routing, retry_on_conflict=3, require_alias=True,
                                   doc=doc)
            except NotFoundError as exc:
                if EngineError.from_body(404, exc.body).index_missing:
                    raise
                return False   # document_missing_exception
        return True

    def get_document(self, index: str, doc_id: str, *, routing: str) -> dict[str, Any] | None:
        with _errors():
            try:
                found = self.client.get(index=index, id=doc_id, routing=routing).body
            except NotFoundError:
                return None
        source: dict[str, Any] = found.get("_source") or {}
        return source

    def delete_document(self, index: str, doc_id: str, *, routing: str, refresh: bool = False) -> bool:
        with _errors():
            try:
                self.client.delete(index=index, id=doc_id, routing=routing, refresh=refresh)
            except NotFoundError:
                return False
        return True

    def mget(self, index: str, ids: Sequence[str], *, routing: str,
             source_includes: Sequence[str] = ()) -> list[dict[str, Any]]:
        with _errors():
            found = self.client.mget(index=index, ids=list(ids), routing=routing,
                                     source_includes=list(source_includes) or None, realtime=True).body
        docs: list[dict[str, Any]] = found.get("docs") or []
        return docs

    def mget_docs(self, docs: Sequence[tuple[str, str]], *, routing: str) -> list[dict[str, Any]]:
        wanted = [{"_index": index, "_id": doc_id, "routing": routing} for index, doc_id in docs]
        with _errors():
            found = self.client.mget(docs=wanted, realtime=True).body
        entries: list[dict[str, Any]] = found.get("docs") or []
        return entries

    def search(self, index: str, body: Mapping[str, Any], *, routing: str | None = None) -> dict[str, Any]:
        with _errors():
            return dict(self.client.search(index=index, routing=routing, body=dict(body)).body)

    def count(self, index: str, query: Mapping[str, Any]) -> int:
        with _errors():
            return int(self.client.count(index=index, query=query)["count"])

    def delete_by_query(self, index: str, query: Mapping[str, Any], *, routing: str | None,
                        timeout_s: float) -> dict[str, Any]:
        with _errors():
            return dict(self.client.options(request_timeout=timeout_s).delete_by_query(
                index=index, routing=routing, query=query, conflicts="proceed", refresh=True,
                wait_for_completion=True).body)


if TYPE_CHECKING:   # mypy proves the engine implements the seam
    def _implements_engine(engine: ElasticsearchEngine) -> SearchEngine:
        return engine
