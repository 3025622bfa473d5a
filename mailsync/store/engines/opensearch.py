"""OpenSearch 2/3 through the official ``opensearch-py`` client.

The only module that imports ``opensearchpy``. It serves the embedded
search node (``search_node/``, OpenSearch 2.19), any OpenSearch cluster,
and osmem-server (which answers as OpenSearch).

The client differs from ``elasticsearch``'s only in its surface: request
bodies go in ``body=`` (no ``operations=``/``document=``/``query=``
keyword arguments), query parameters are keyword arguments or ``params``,
answers are plain dicts, and the errors are ``TransportError`` subclasses
whose ``status_code`` is ``"N/A"`` when no answer came. Credentials for a
secured cluster go in the URL (``https://user:password@host:9200``), which
the client turns into basic authentication.
"""

from __future__ import annotations

import contextlib
import gzip
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import orjson
from opensearchpy import OpenSearch, Urllib3HttpConnection
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from opensearchpy.exceptions import ConnectionTimeout, NotFoundError, SerializationError, TransportError
from opensearchpy.serializer import JSONSerializer

from mailsync.errors import StoreError
from mailsync.keepalive_http import ConnectionFailed, Connections, Origin
from mailsync.store.engine import INDEX_IDENTITY_PATHS, NO_ANSWER, EngineError

if TYPE_CHECKING:
    from mailsync.store.engine import SearchEngine


class _OrjsonSerializer(JSONSerializer):
    """orjson both ways: bulk answers carry one item per message (the stdlib costs ~7x more per item)."""

    def loads(self, s: str) -> Any:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError as exc:
            raise SerializationError(s[:200], exc) from exc

    def dumps(self, data: Any) -> Any:
        if isinstance(data, str | bytes):
            return data
        try:
            return orjson.dumps(data)
        except TypeError as exc:
            raise SerializationError(repr(data)[:200], exc) from exc


class _KeepAliveConnection(Urllib3HttpConnection):
    """opensearch-py's connection over ``mailsync.keepalive_http`` instead of urllib3's pool.

    Why: a store request through urllib3 prepared the URL, took a pooled
    connection and parsed the answer's headers with ``http.client`` (the
    ``email`` package): ~0.5 ms of CPU, ~4 store requests per mailbox change
    (docs/scaling.md, "CPU per change"). Everything else is the client's:
    the headers it sets (basic auth from the URL, keep-alive, compression),
    the logging, the error mapping (``_raise_error``), the retries of its
    Transport. A failed exchange is its ``ConnectionError`` (``ConnectionTimeout``
    when it timed out), as urllib3's were.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parts = urlsplit(self.host)
        self._origin = Origin(parts.scheme, parts.hostname or "", parts.port or (443 if self.use_ssl else 80))
        self._tls = ssl.create_default_context(cafile=self.default_ca_certs()) if self.use_ssl else None
        self._by_timeout: dict[float, Connections] = {}

    def perform_request(self, method: str, url: str, params: Mapping[str, Any] | None = None,
                        body: bytes | None = None, timeout: float | None = None, ignore: Any = (),
                        headers: Mapping[str, str] | None = None) -> Any:
        url = self.url_prefix + url
        if params:
            url = f"{url}?{urlencode(params)}"
        full_url = self.host + url
        request_headers = dict(self.headers)
        request_headers.update(headers or ())
        sent = body
        if self.http_compress and body:
            sent = self._gzip_compress(body)
            request_headers["content-encoding"] = "gzip"
        if callable(self.http_auth):
            request_headers.update(self.http_auth(method, full_url, sent))
        start = time.time()
        try:
            answer = self._connections(timeout or self.timeout).request(method, url, request_headers, sent or b"")
        except ConnectionFailed as exc:
            self.log_request_fail(method, full_url, url, body, time.time() - start, exception=exc)
            if exc.timed_out:
                raise ConnectionTimeout("TIMEOUT", str(exc), exc) from exc
            raise OpenSearchConnectionError("N/A", str(exc), exc) from exc
        duration = time.time() - start
        content = answer.body
        if answer.headers.get("content-encoding", "").lower() == "gzip" and content:
            content = gzip.decompress(content)
        raw = content.decode("utf-8", "surrogatepass")
        if not 200 <= answer.status < 300 and answer.status not in ignore:
            self.log_request_fail(method, full_url, url, body, duration, answer.status, raw)
            self._raise_error(answer.status, raw, answer.headers.get("content-type"))
        self.log_request_success(method, full_url, url, body, answer.status, raw, duration)
        return answer.status, answer.headers, raw

    def _connections(self, timeout_s: float) -> Connections:
        conns = self._by_timeout.get(timeout_s)
        if conns is None:   # a race makes one more, used once: harmless
            conns = Connections(self._origin, connect_timeout_s=min(10.0, timeout_s), read_timeout_s=timeout_s,
                                tls=self._tls)
            self._by_timeout[timeout_s] = conns
        return conns

    def close(self) -> None:
        for conns in list(self._by_timeout.values()):
            conns.close()
        super().close()


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The client's exceptions as EngineError (answers and missing answers) or StoreError (our bug)."""
    try:
        yield
    except OpenSearchConnectionError as exc:   # refused, reset, timeout, TLS: status_code is "N/A"
        raise EngineError(NO_ANSWER, type(exc.info).__name__ if exc.info else type(exc).__name__,
                          str(exc.error)) from exc
    except TransportError as exc:
        status = exc.status_code if isinstance(exc.status_code, int) else NO_ANSWER
        raise EngineError.from_body(status, exc.info, str(exc.error)) from exc
    except SerializationError as exc:
        raise StoreError(f"cannot encode or decode a store request: {exc}") from exc


class OpenSearchEngine:
    """:class:`mailsync.store.engine.SearchEngine` on the ``opensearch-py`` client."""

    name = "opensearch"

    def __init__(self, client: OpenSearch) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, *, request_timeout_s: float = 30.0, pool_size: int = 10) -> OpenSearchEngine:
        return cls(OpenSearch(
            hosts=[url],
            serializer=_OrjsonSerializer(),
            connection_class=_KeepAliveConnection,
            timeout=request_timeout_s,
            max_retries=2,
            retry_on_timeout=True,
            # Concurrent bulk writers each hold a connection; urllib3 discards what exceeds the pool.
            pool_maxsize=pool_size,
        ))

    def info(self) -> dict[str, Any]:
        with _errors():
            return dict(self.client.info())

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
        body = {key: value for key, value in (("mappings", mappings), ("settings", settings), ("aliases", aliases))
                if value is not None}
        with _errors():
            self.client.indices.create(index=index, body=body)

    def delete_indices(self, names: Sequence[str]) -> None:
        with _errors():
            self.client.indices.delete(index=list(names), ignore_unavailable=True, ignore=404)

    def put_alias(self, index: str, name: str) -> None:
        with _errors():
            self.client.indices.put_alias(index=index, name=name)

    def get_indices(self, names: Sequence[str]) -> dict[str, Any]:
        with _errors():
            return dict(self.client.indices.get(index=list(names), filter_path=list(INDEX_IDENTITY_PATHS)))

    def get_settings(self, index: str) -> dict[str, Any]:
        with _errors():
            return dict(self.client.indices.get_settings(index=index))

    def put_settings(self, index: str, settings: Mapping[str, Any]) -> None:
        with _errors():
            self.client.indices.put_settings(index=index, body=dict(settings))

    def refresh(self, indices: Sequence[str]) -> None:
        with _errors():
            self.client.indices.refresh(index=list(indices))

    def bulk(self, body: bytes) -> dict[str, Any]:
        with _errors():
            return dict(self.client.bulk(body=body, require_alias=True))

    def index_document(self, index: str, doc_id: str, *, routing: str, document: Mapping[str, Any],
                       refresh: bool = False) -> None:
        with _errors():
            self.client.index(index=index, id=doc_id, body=dict(document), routing=routing, refresh=refresh,
                              require_alias=True)

    def update_document(self, index: str, doc_id: str, *, routing: str, doc: Mapping[str, Any]) -> bool:
        with _errors():
            try:
                self.client.update(index=index, id=doc_id, body={"doc": dict(doc)}, routing=routing,
                                   retry_on_conflict=3, require_alias=True)
            except NotFoundError as exc:
                if EngineError.from_body(404, exc.info).index_missing:
                    raise
                return False   # document_missing_exception
        return True

    def get_document(self, index: str, doc_id: str, *, routing: str) -> dict[str, Any] | None:
        with _errors():
            try:
                found = self.client.get(index=index, id=doc_id, routing=routing)
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
        filtered = {"_source_includes": list(source_includes)} if source_includes else {}
        with _errors():
            found = self.client.mget(index=index, body={"ids": list(ids)}, routing=routing, realtime=True,
                                     **filtered)
        docs: list[dict[str, Any]] = found.get("docs") or []
        return docs

    def mget_docs(self, docs: Sequence[tuple[str, str]], *, routing: str) -> list[dict[str, Any]]:
        body = {"docs": [{"_index": index, "_id": doc_id, "routing": routing} for index, doc_id in docs]}
        with _errors():
            found = self.client.mget(body=body, realtime=True)
        entries: list[dict[str, Any]] = found.get("docs") or []
        return entries

    def search(self, index: str, body: Mapping[str, Any], *, routing: str | None = None) -> dict[str, Any]:
        with _errors():
            if routing is None:
                return dict(self.client.search(index=index, body=dict(body)))
            return dict(self.client.search(index=index, body=dict(body), routing=routing))

    def count(self, index: str, query: Mapping[str, Any]) -> int:
        with _errors():
            return int(self.client.count(index=index, body={"query": dict(query)})["count"])

    def delete_by_query(self, index: str, query: Mapping[str, Any], *, routing: str | None,
                        timeout_s: float) -> dict[str, Any]:
        with _errors():
            return dict(self.client.delete_by_query(
                index=index, body={"query": dict(query)}, routing=routing, conflicts="proceed", refresh=True,
                wait_for_completion=True, request_timeout=timeout_s))


if TYPE_CHECKING:   # mypy proves the engine implements the seam
    def _implements_engine(engine: OpenSearchEngine) -> SearchEngine:
        return engine
