"""How Graph requests travel: our keep-alive connections, or ``requests`` when a proxy is configured.

Why not ``requests`` always: per request it prepares the URL (IDNA,
re-quoting), merges the session's settings and cookie jar, looks up the
connection pool key and the CA bundle on disk, and ``http.client`` parses
the answer's headers with the ``email`` package: ~1 ms of CPU per Graph
request, ~1.4 requests per mailbox change (docs/scaling.md, "CPU per
change"). :class:`KeepAliveTransport` sends the same request on one
keep-alive connection of the origin's few (``mailsync.keepalive_http``),
asks for gzip as requests does, and follows a GET's redirects (dropping the
Authorization header when the origin changes, as requests does). With a
proxy variable set (``Settings.http_clients_read_env``) the
:class:`RequestsTransport` keeps requests' per-request reading of the
proxy settings (``no_proxy`` works only that way).
"""

from __future__ import annotations

import ssl
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from mailsync.keepalive_http import BodyTooLarge, ConnectionFailed, Connections, Origin, default_tls

CONNECT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)

__all__ = ["BodyTooLarge", "GraphResponse", "GraphTransport", "KeepAliveTransport", "RequestsTransport",
           "TransportFailed"]


class TransportFailed(Exception):
    """The request could not be sent or its answer not read (refused, reset, timed out, cut)."""


@dataclass(frozen=True)
class GraphResponse:
    """An answer: status, headers (names lower-cased), the whole body (decompressed)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class GraphTransport(Protocol):
    """Sends one request; raises :class:`TransportFailed`, or ``BodyTooLarge`` past ``max_bytes``."""

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, timeout_s: float,
             max_bytes: int | None = None) -> GraphResponse: ...

    def close(self) -> None: ...


class KeepAliveTransport:
    """Graph over ``mailsync.keepalive_http``: kept-alive connections per origin, shared by an app's clients."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, ca_bundle: str | None = None) -> None:
        """``tls``: the context for https origins; without one it is made from ``ca_bundle`` (a PEM file or a
        hashed directory; certifi's bundle when None)."""
        # The TLS context is made with the first https origin, not here: loading a CA bundle is ~25-100 ms
        # of CPU, and every worker process builds this transport with its sync engine, on its first job,
        # whether or not it ever talks to Graph (an IMAP account's initial sync paid it before its first
        # folder round; bench/README.md).
        self._tls = tls
        self._ca_bundle = ca_bundle
        self._connections: dict[tuple[Origin, float], Connections] = {}
        self._lock = threading.Lock()

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, timeout_s: float,
             max_bytes: int | None = None) -> GraphResponse:
        sent = {**headers, "Accept-Encoding": "gzip"}
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            origin = Origin.of(parts)
            if origin is None:
                raise TransportFailed(f"not an http(s) URL: {url[:100]!r}")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                answer = self._for(origin, timeout_s).request(method, target, sent, body or b"",
                                                              max_bytes=max_bytes)
            except ConnectionFailed as exc:
                raise TransportFailed(str(exc)) from exc
            location = answer.headers.get("location")
            if answer.status not in _REDIRECTS or not location or method != "GET":
                return GraphResponse(answer.status, answer.headers, _decoded(answer.headers, answer.body, max_bytes))
            following = urljoin(url, location)
            if urlsplit(following)[:2] != parts[:2]:
                sent.pop("Authorization", None)   # a bearer token stays with the origin it was meant for
            url = following
        raise TransportFailed(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for conns in connections:
            conns.close()

    def _for(self, origin: Origin, timeout_s: float) -> Connections:
        key = (origin, timeout_s)
        conns = self._connections.get(key)
        if conns is None:
            with self._lock:
                conns = self._connections.get(key)
                if conns is None:
                    if origin.scheme == "https" and self._tls is None:
                        self._tls = _tls_from(self._ca_bundle)
                    conns = Connections(origin, connect_timeout_s=min(CONNECT_TIMEOUT_S, timeout_s),
                                        read_timeout_s=timeout_s, tls=self._tls if origin.scheme == "https" else None)
                    self._connections[key] = conns
        return conns


def _tls_from(ca_bundle: str | None) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_bundle`` (a file, or a hashed directory), else certifi's bundle."""
    if not ca_bundle:
        return default_tls()
    if Path(ca_bundle).is_dir():
        return ssl.create_default_context(capath=ca_bundle)
    return ssl.create_default_context(cafile=ca_bundle)


def _decoded(headers: Mapping[str, str], body: bytes, max_bytes: int | None) -> bytes:
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity") or not body:
        return body
    if encoding not in ("gzip", "deflate"):
        raise TransportFailed(f"an answer in an encoding we did not ask for: {encoding}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, max_bytes + 1 if max_bytes is not None else 0)
    except zlib.error as exc:
        raise TransportFailed(f"the {encoding} answer does not decompress: {exc}") from exc
    if max_bytes is not None and len(plain) > max_bytes:
        raise BodyTooLarge(f"the answer is more than {max_bytes} bytes")
    return plain


class RequestsTransport:
    """Graph through a pooled ``requests.Session`` that reads proxies from the environment per request."""

    def __init__(self, pool_size: int = 16, *, session: requests.Session | None = None) -> None:
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session

    @classmethod
    def around(cls, session: requests.Session) -> RequestsTransport:
        """Through an existing session (sign-in's: the sandbox's routing session sends Microsoft hosts to it)."""
        return cls(session=session)

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, timeout_s: float,
             max_bytes: int | None = None) -> GraphResponse:
        try:
            response = self._session.request(method, url, data=body, headers=dict(headers), timeout=timeout_s,
                                             stream=max_bytes is not None)
        except requests.RequestException as exc:
            raise TransportFailed(f"{type(exc).__name__}") from exc
        try:
            if max_bytes is None:
                content = response.content
            else:
                chunks: list[bytes] = []
                total = 0
                for chunk in response.iter_content(64 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise BodyTooLarge(f"the answer is more than {max_bytes} bytes")
                    chunks.append(chunk)
                content = b"".join(chunks)
        except requests.RequestException as exc:
            raise TransportFailed(f"the answer was cut: {type(exc).__name__}") from exc
        finally:
            response.close()
        return GraphResponse(response.status_code, {k.lower(): v for k, v in response.headers.items()}, content)

    def close(self) -> None:
        self._session.close()
