"""A TCP proxy in front of Dovecot that misbehaves on purpose: cut connections, BYE, NO.

Providers connect to ``proxy.port`` instead of Dovecot's. For each command
line a client sends (after it has logged in), the proxy may, with seeded
probabilities:

* ``bye_rate`` — answer ``* BYE`` and close the connection (a server
  shutting down, an idle timeout, a load balancer);
* ``no_rate`` — answer ``<tag> NO [UNAVAILABLE]`` without passing the
  command on (a server that is overloaded or briefly cannot open the
  mailbox), for commands that read mail or folders;
* ``cut_rate`` — pass a FETCH on and cut the connection somewhere inside
  its response (a network drop mid-FETCH: imapclient sees half a literal).

Only the command lines are looked at (literals the client sends are
passed through unread); the server's bytes are forwarded untouched until
a cut. Counters say what happened.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import threading
from dataclasses import dataclass, field

_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
_NO_COMMANDS = (b"FETCH", b"SEARCH", b"EXAMINE", b"SELECT", b"LIST", b"STATUS", b"SORT")
_NEVER = (b"LOGIN", b"AUTHENTICATE", b"CAPABILITY", b"LOGOUT", b"ENABLE", b"STARTTLS", b"DONE", b"IDLE")


@dataclass
class FaultCounts:
    byes: int = 0
    nos: int = 0
    cuts: int = 0
    connections: int = 0


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    seed: int = 0
    bye_rate: float = 0.0
    no_rate: float = 0.0
    cut_rate: float = 0.0
    counts: FaultCounts = field(default_factory=FaultCounts)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._forced = FaultCounts()
        self._thread = threading.Thread(target=self._accept, name="imap-fault-proxy", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def quiet(self) -> None:
        """No more faults from now on."""
        self.bye_rate = self.no_rate = self.cut_rate = 0.0
        with self._lock:
            self._forced = FaultCounts()

    def force(self, *, byes: int = 0, nos: int = 0, cuts: int = 0) -> None:
        """Inject these faults at the next commands they apply to, whatever the rates draw.

        Rates alone leave it to timing whether a fault happens at all: how
        many commands pass while the faults are on depends on how fast the
        client gets through (an initial sync under load sent ~25 FETCHes:
        at a cut rate of 0.08, no cut one run in eight). A test that needs
        each fault to have happened forces one of each.
        """
        with self._lock:
            self._forced = FaultCounts(byes=byes, nos=nos, cuts=cuts)

    def _take(self, kind: str) -> bool:
        """One forced fault of ``kind`` ("byes", "nos", "cuts"), if one is left."""
        with self._lock:
            left = getattr(self._forced, kind)
            if left > 0:
                setattr(self._forced, kind, left - 1)
            return left > 0

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _shut(sock)
        self._thread.join(timeout=5)

    def _roll(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection((self.upstream_host, self.upstream_port), timeout=10)
            except OSError:
                _shut(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self.counts.connections += 1
                self._open.update((client, upstream))
            link = _Link(self, client, upstream)
            threading.Thread(target=link.client_to_server, daemon=True).start()
            threading.Thread(target=link.server_to_client, daemon=True).start()


class _Link:
    """One proxied connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.cut_after: int | None = None
        self.logged_in = False
        self.lock = threading.Lock()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            _shut(sock)
        with self.proxy._lock:
            self.proxy._open.discard(self.client)
            self.proxy._open.discard(self.upstream)

    def client_to_server(self) -> None:
        buffer = b""
        literal = 0
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                buffer += data
                while buffer:
                    if literal:
                        chunk, buffer = buffer[:literal], buffer[literal:]
                        literal -= len(chunk)
                        self.upstream.sendall(chunk)
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    if not self._command(line):
                        return
                    found = _LITERAL.search(line)
                    if found:
                        literal = int(found.group(1))
        except OSError:
            pass
        finally:
            self.close()

    def _command(self, line: bytes) -> bool:
        """Handle one command line; False when the connection was closed on purpose."""
        parts = line.split(b" ", 3)
        tag = parts[0]
        words = [p.upper() for p in parts[1:3]]
        command = words[1] if words and words[0] == b"UID" and len(words) > 1 else (words[0] if words else b"")
        proxy = self.proxy
        if command in (b"LOGIN", b"AUTHENTICATE"):
            self.logged_in = True
        if self.logged_in and command not in _NEVER and command:
            if proxy._take("byes") or proxy._roll(proxy.bye_rate):
                with proxy._lock:
                    proxy.counts.byes += 1
                with self.lock:
                    self.client.sendall(b"* BYE injected fault: shutting down\r\n")
                self.close()
                return False
            if command in _NO_COMMANDS and (proxy._take("nos") or proxy._roll(proxy.no_rate)):
                with proxy._lock:
                    proxy.counts.nos += 1
                with self.lock:
                    self.client.sendall(tag + b" NO [UNAVAILABLE] injected fault: try again later\r\n")
                return True
            if command == b"FETCH" and (proxy._take("cuts") or proxy._roll(proxy.cut_rate)):
                with proxy._lock:
                    proxy.counts.cuts += 1
                    self.cut_after = proxy._rng.randrange(1, 6000)
        self.upstream.sendall(line + b"\r\n")
        return True

    def server_to_client(self) -> None:
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                with self.lock:
                    if self.cut_after is not None:
                        if len(data) >= self.cut_after:
                            self.client.sendall(data[: self.cut_after])
                            break
                        self.cut_after -= len(data)
                    self.client.sendall(data)
        except OSError:
            pass
        finally:
            self.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
