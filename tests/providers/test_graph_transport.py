"""Graph's keep-alive transport (mailsync/providers/graph_transport.py) on what requests did for us.

Gzip answers, redirects (the bearer token stays with its origin), a body cap
for attachments, parameters encoded as requests encoded them, and failures
as ProviderUnavailable. A small local HTTP server plays Graph's edge (the
sandbox never redirects or compresses); the provider and actions contract
tests run the transport against the sandbox.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import certifi
import orjson
import pytest

from mailsync.errors import PayloadTooLarge, ProviderUnavailable
from mailsync.providers.graph_client import GraphClient


class _Graph(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None]] = []
    other = ""          # another origin to redirect to

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        if "/gzip" in self.path:
            body = gzip.compress(orjson.dumps({"value": ["x" * 1000]}))
            self._answer(200, body, {"Content-Encoding": "gzip", "Content-Type": "application/json"})
        elif "/moved" in self.path:
            self._answer(302, b"", {"Location": "/gzip"})
        elif "/away" in self.path:
            self._answer(302, b"", {"Location": f"{self.other}/landing"})
        elif "/big" in self.path:
            self._answer(200, b"a" * 5000, {"Content-Type": "application/octet-stream"})
        else:
            self._answer(200, orjson.dumps({"path": self.path}), {"Content-Type": "application/json"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve() -> tuple[ThreadingHTTPServer, type[_Graph]]:
    handler = type("Graph", (_Graph,), {"seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, handler


@pytest.fixture
def graph() -> Iterator[tuple[GraphClient, type[_Graph], type[_Graph]]]:
    main, handler = _serve()
    other, other_handler = _serve()
    handler.other = f"http://127.0.0.1:{other.server_address[1]}"
    client = GraphClient(lambda _force: "token", base_url=f"http://127.0.0.1:{main.server_address[1]}/v1.0")
    yield client, handler, other_handler
    client.close()
    for server in (main, other):
        server.shutdown()
        server.server_close()


def test_gzip_redirects_and_parameters(graph: tuple[GraphClient, type[_Graph], type[_Graph]]) -> None:
    client, seen, other = graph
    assert client.get("/gzip") == {"value": ["x" * 1000]}
    assert client.get("/moved") == {"value": ["x" * 1000]}                  # followed on the same origin
    assert client.get("me/messages", params={"$select": "id,subject", "q": "a b"}) == {
        "path": "/v1.0/me/messages?%24select=id%2Csubject&q=a+b"}            # as requests encoded them
    assert [auth for _path, auth in seen.seen] == ["Bearer token"] * 4
    assert client.get("/away") == {"path": "/landing"}
    assert other.seen == [("/landing", None)]                               # the token stayed home


def test_an_attachment_past_the_cap_is_refused_and_a_dead_host_is_unavailable(
        graph: tuple[GraphClient, type[_Graph], type[_Graph]]) -> None:
    client, _seen, _other = graph
    assert client.get_bytes("/big", max_bytes=5000) == (b"a" * 5000, "application/octet-stream")
    with pytest.raises(PayloadTooLarge):
        client.get_bytes("/big", max_bytes=4999)
    assert client.get("/after") == {"path": "/v1.0/after"}                      # the connection was replaced
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = GraphClient(lambda _force: "t", base_url=f"http://127.0.0.1:{probe.getsockname()[1]}", timeout_s=2)
        with pytest.raises(ProviderUnavailable):
            dead.get("me")


@pytest.mark.parametrize("ca_bundle", [None, certifi.where()], ids=["certifi", "configured bundle"])
def test_the_tls_context_is_made_with_the_first_https_origin_once(
        graph: tuple[GraphClient, type[_Graph], type[_Graph]], monkeypatch: pytest.MonkeyPatch,
        ca_bundle: str | None) -> None:
    """Loading a CA bundle costs every worker process ~25-100 ms of CPU on its first job: paid only by one
    that talks to Graph over TLS, and once."""
    import mailsync.providers.graph_transport as transport

    made: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    client, _seen, _other = graph
    fresh = GraphClient(lambda _force: "token", base_url=client.base_url,
                        session=transport.KeepAliveTransport(ca_bundle=ca_bundle))
    assert fresh.get("/plain") == {"path": "/v1.0/plain"} and not made, "plain HTTP: no TLS context"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        for path in ("me", "me/again"):
            with pytest.raises(ProviderUnavailable):
                fresh.get(f"https://127.0.0.1:{port}/{path}")
    assert len(made) == 1
