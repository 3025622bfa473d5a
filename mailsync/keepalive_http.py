"""Kept-alive HTTP/1.1 connections to an origin, shared by the threads, on plain (or TLS) sockets.

Used for the hot path's HTTP: Azure Storage (``mailsync.storage.rest``) and
Microsoft Graph (``mailsync.providers.graph_client``). Why not
``http.client`` or urllib3 / requests: both parse every answer's headers
with the ``email`` package, and urllib3/requests add a pool, a session
merge, cookie jars and per-request settings on top; for the small JSON and
XML answers of Tables, Queues and Graph's delta pages that was most of a
call's CPU (docs/scaling.md, "CPU per change"). The answers are plain
HTTP/1.1: a status line, headers, and a body framed by ``Content-Length``
or ``Transfer-Encoding: chunked`` (Azurite chunks, Azure sets a length).

The threads share a few idle connections per origin (a list under a lock:
short-lived threads, such as a folder round's page reader, reuse them
instead of opening one, and a TLS handshake, each). An idle connection the
server closed (keep-alive timeouts: Azurite 5 s, Azure ~2 min) is noticed
before reuse (the socket is readable: EOF) and replaced; a request that
fails on a reused connection before any byte of the answer came is sent
once more on a new one (the server dropped it between our check and our
write). Every other failure is a :class:`ConnectionFailed` for the retry
policy.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import SplitResult

import certifi

MAX_HEADER_LINES = 200
MAX_LINE = 65536


class BodyTooLarge(Exception):
    """The answer's body is larger than the caller's ``max_bytes`` (nothing more of it is read)."""


class ConnectionFailed(Exception):
    """The request could not be sent or its answer not read (refused, reset, timed out, cut)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Response:
    """An answer: its status, its headers (names lower-cased) and its whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Origin:
    """Where requests go: ``https`` or ``http``, a host and a port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, parts: SplitResult) -> Origin | None:
        """The origin of a split ``http(s)`` URL (the scheme's port when it names none); None for another
        scheme or no host."""
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def default_tls() -> ssl.SSLContext:
    """Certificates verified against certifi's bundle, as requests (and the SDKs through it) verified them."""
    return ssl.create_default_context(cafile=certifi.where())


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb")
        self.used = False

    def close(self) -> None:
        for closing in (self.reader.close, self.sock.close):
            with contextlib.suppress(OSError):
                closing()


class Connections:
    """Requests to one origin on kept-alive connections shared by the threads: a request takes an idle one
    (or opens one) and gives it back when the answer was read whole and the server keeps it open."""

    def __init__(self, origin: Origin, *, connect_timeout_s: float, read_timeout_s: float,
                 tls: ssl.SSLContext | None = None, max_idle: int = 16) -> None:
        if origin.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {origin.scheme!r}")
        self.origin = origin
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle
        self._tls = tls if tls is not None or origin.scheme == "http" else default_tls()
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()

    def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes = b"", *,
                max_bytes: int | None = None) -> Response:
        """Send ``method target`` with ``headers`` (no Host: added here, as Content-Length when missing) and read
        the answer; a body over ``max_bytes`` raises :class:`BodyTooLarge` (the connection is dropped)."""
        head = [f"{method} {target} HTTP/1.1\r\nHost: {self.origin.host_header}\r\n"]
        head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        if "Content-Length" not in headers and (body or method in ("POST", "PUT", "PATCH", "MERGE")):
            head.append(f"Content-Length: {len(body)}\r\n")
        data = ("".join(head) + "\r\n").encode("latin-1") + body
        conn = self._take()
        try:
            return self._exchange(conn, data, method, max_bytes)
        except _NothingReceived as exc:
            conn.close()
            if not conn.used:
                raise ConnectionFailed(str(exc)) from exc
        # The server closed the kept-alive connection as we wrote: once more on a new one.
        conn = self._open()
        try:
            return self._exchange(conn, data, method, max_bytes)
        except _NothingReceived as exc:
            conn.close()
            raise ConnectionFailed(str(exc)) from exc

    def close(self) -> None:
        """Close the idle connections (those in use close when their request ends; new requests open new ones)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- one exchange --------------------------------------------------------------------

    def _exchange(self, conn: _Conn, data: bytes, method: str, max_bytes: int | None) -> Response:
        try:
            conn.sock.sendall(data)
            status_line = conn.reader.readline(MAX_LINE + 1)
        except TimeoutError as exc:
            conn.close()
            raise ConnectionFailed("the server did not answer in time", timed_out=True) from exc
        except OSError as exc:
            raise _NothingReceived(f"sending the request failed: {exc}") from exc
        if not status_line:
            raise _NothingReceived("the connection was closed before an answer")
        try:
            response, keep = self._read_answer(conn.reader, status_line, method, max_bytes)
        except BodyTooLarge:
            conn.close()
            raise
        except TimeoutError as exc:
            conn.close()
            raise ConnectionFailed("the answer stopped coming", timed_out=True) from exc
        except (OSError, ValueError) as exc:
            conn.close()
            raise ConnectionFailed(f"reading the answer failed: {exc}") from exc
        conn.used = True
        if keep:
            self._give_back(conn)
        else:
            conn.close()
        return response

    @staticmethod
    def _read_answer(reader: BinaryIO, status_line: bytes, method: str,
                     max_bytes: int | None) -> tuple[Response, bool]:
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = reader.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ValueError("the answer ended inside its headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ValueError(f"a malformed header line: {line[:80]!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        else:
            raise ValueError("too many header lines")
        keep = headers.get("connection", "").lower() != "close" and parts[0] != b"HTTP/1.0"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b""), keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(status, headers, _read_chunked(reader, max_bytes)), keep
        length = headers.get("content-length")
        if length is not None:
            size = int(length)
            if max_bytes is not None and size > max_bytes:
                raise BodyTooLarge(f"the answer is {size} bytes, more than {max_bytes}")
            body = reader.read(size)
            if len(body) != size:
                raise ValueError("the answer's body was cut short")
            return Response(status, headers, body), keep
        rest = reader.read() if max_bytes is None else reader.read(max_bytes + 1)   # delimited by the close
        if max_bytes is not None and len(rest) > max_bytes:
            raise BodyTooLarge(f"the answer is more than {max_bytes} bytes")
        return Response(status, headers, rest), False

    # -- connections ----------------------------------------------------------------------

    def _take(self) -> _Conn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._open()
            if not _closed_by_peer(conn.sock):
                return conn
            conn.close()

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _open(self) -> _Conn:
        try:
            sock = socket.create_connection((self.origin.host, self.origin.port), timeout=self.connect_timeout_s)
        except TimeoutError as exc:
            raise ConnectionFailed(f"connecting to {self.origin.host_header} timed out", timed_out=True) from exc
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {self.origin.host_header}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.origin.host)
            sock.settimeout(self.read_timeout_s)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ConnectionFailed(f"TLS with {self.origin.host_header} failed: {exc}") from exc
        return _Conn(sock)


class _NothingReceived(Exception):
    """The request failed before any byte of an answer: safe to send again on a new connection."""


def _read_chunked(reader: BinaryIO, max_bytes: int | None) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_line = reader.readline(MAX_LINE + 1)
        if not size_line:
            raise ValueError("the chunked body was cut short")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:   # trailers, up to the blank line
                trailer = reader.readline(MAX_LINE + 1)
                if trailer in (b"\r\n", b"\n", b""):
                    return b"".join(chunks)
        total += size
        if max_bytes is not None and total > max_bytes:
            raise BodyTooLarge(f"the answer is more than {max_bytes} bytes")
        chunk = reader.read(size)
        if len(chunk) != size:
            raise ValueError("a chunk was cut short")
        chunks.append(chunk)
        reader.readline(MAX_LINE + 1)   # the chunk's CRLF


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle connection is readable only when the server closed it (or broke the protocol)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()   # not select.select: it refuses descriptors past 1023
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True
