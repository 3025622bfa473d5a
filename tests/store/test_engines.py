"""Choosing the engine (SEARCH_ENGINE=auto asks GET /), and why there is one client per engine."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from mailsync.errors import StoreError, StoreUnavailable
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engines import connect, detect


def test_auto_names_the_server_it_talks_to(search_store_url: str, search_engine: SearchEngine) -> None:
    assert detect(search_store_url) == search_engine.name
    version = search_engine.info()["version"]
    if search_engine.name == "opensearch":
        assert version["distribution"] == "opensearch"


def test_the_elasticsearch_client_cannot_talk_to_opensearch(search_store_url: str,
                                                            search_engine: SearchEngine) -> None:
    """Why OpenSearch has its own engine module: the elasticsearch client refuses any other product."""
    if search_engine.name != "opensearch":
        pytest.skip("the server is Elasticsearch")
    if requests.get(search_store_url, timeout=10).headers.get("X-Elastic-Product"):
        # osmem, the in-memory stand-in, answers as OpenSearch and still sends the header the
        # elasticsearch client checks: the refusal this test shows is real OpenSearch's.
        pytest.skip("a stand-in that also answers as Elasticsearch (osmem)")
    engine = connect(search_store_url, engine="elasticsearch")
    try:
        with pytest.raises(EngineError, match="not Elasticsearch"):
            engine.info()
    finally:
        engine.close()


@pytest.fixture
def fake_server() -> Iterator[tuple[str, dict[str, object]]]:
    """An HTTP server on a free port answering GET / with ``answer["status"]`` and ``answer["body"]``."""
    answer: dict[str, object] = {"status": 200, "body": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(answer["body"]).encode()
            self.send_response(int(answer["status"]))   # type: ignore[call-overload]
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


def test_what_get_slash_says_decides_the_engine(fake_server: tuple[str, dict[str, object]]) -> None:
    url, answer = fake_server
    answer["body"] = {"version": {"number": "8.17.0", "build_flavor": "default"}, "tagline": "You Know, for Search"}
    assert detect(url) == "elasticsearch"
    answer["body"] = {"version": {"number": "3.1.0", "distribution": "opensearch"}}
    assert detect(url) == "opensearch"
    answer["body"] = {"version": {"number": "1.2.0", "distribution": "somethingelse"}}
    with pytest.raises(StoreError, match=r"somethingelse 1\.2\.0"):
        detect(url)
    answer["body"] = {"hello": "world"}
    with pytest.raises(StoreError, match="does not answer GET / like a search engine"):
        connect(url)
    answer["status"], answer["body"] = 503, {"error": "starting"}
    with pytest.raises(StoreUnavailable):
        connect(url)


def test_credentials_in_the_url_stay_out_of_errors() -> None:
    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreUnavailable) as caught:
        connect(f"http://admin:s3cret@127.0.0.1:{port}", request_timeout_s=2)
    assert "s3cret" not in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)


def test_mget_gives_the_whole_source_unless_fields_are_named(search_engine: SearchEngine) -> None:
    """No filter unless asked (SearchEngine.mget: the node filters each document's source on its own)."""
    index = f"mget-{uuid.uuid4().hex[:8]}"
    search_engine.create_index(f"{index}-v1")
    search_engine.put_alias(f"{index}-v1", index)     # documents are written through aliases only
    search_engine.index_document(index, "d1", routing="r", document={"a": 1, "b": {"c": 2}, "d": "x"})
    try:
        (whole, missing) = search_engine.mget(index, ["d1", "nope"], routing="r")
        assert whole["found"] and whole["_source"] == {"a": 1, "b": {"c": 2}, "d": "x"}
        assert isinstance(whole["_seq_no"], int) and isinstance(whole["_primary_term"], int)
        assert not missing["found"]
        (named,) = search_engine.mget(index, ["d1"], routing="r", source_includes=["a", "b.c"])
        assert named["_source"] == {"a": 1, "b": {"c": 2}}
    finally:
        search_engine.delete_indices([f"{index}-v1"])
