"""The REST clients' transport: connection strings, SAS, keep-alive connections, retries (mailsync/storage/rest/).

Shared Key signing is checked by Azurite itself (it refuses a wrong
signature with 403) in every test of this folder; here: a SAS connection
string against Azurite, and the connection's behaviour when a server closes
kept-alive connections, chunks its answers or answers 503 (a small local
HTTP server: Azurite cannot be made to do those on demand).
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ServiceRequestError
from azure.data.tables import AccountSasPermissions, ResourceTypes, generate_account_sas

from mailsync.errors import ConfigurationError
from mailsync.keepalive_http import ConnectionFailed, Connections, Origin
from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from mailsync.storage.rest.auth import DEV_ACCOUNT, StorageAccount
from mailsync.storage.rest.retry import RetryPolicy
from mailsync.storage.table_errors import ensure_table


def test_connection_strings_as_the_functions_host_takes_them() -> None:
    azure = StorageAccount.from_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn")
    assert azure.table.url == "https://acct.table.core.chinacloudapi.cn" and azure.auth.account == "acct"
    assert azure.queue.url == "https://acct.queue.core.chinacloudapi.cn"
    dev = StorageAccount.from_connection_string("UseDevelopmentStorage=true")
    assert (dev.table.url, dev.auth.account) == ("http://127.0.0.1:10002/devstoreaccount1", DEV_ACCOUNT)
    sas = StorageAccount.from_connection_string(
        "TableEndpoint=https://acct.table.core.windows.net/;QueueEndpoint=https://acct.queue.core.windows.net/;"
        "SharedAccessSignature=sv=2019-02-02&sig=abc")
    assert sas.auth.sas == "sv=2019-02-02&sig=abc" and sas.auth.account == "acct"
    for bad in ("AccountName=acct", "AccountName=acct;AccountKey=not*base64", "no-equals-sign", "TableEndpoint=ftp://x"):
        with pytest.raises(ConfigurationError):
            StorageAccount.from_connection_string(bad)


def test_a_sas_connection_string_reaches_azurite(storage_settings: Settings) -> None:
    account = StorageAccount.from_connection_string(storage_settings.storage_connection_string or "")
    key = (storage_settings.storage_connection_string or "").split("AccountKey=")[1].split(";")[0]
    sas = generate_account_sas(AzureNamedKeyCredential(account.auth.account, key),
                               resource_types=ResourceTypes(service=True, container=True, object=True),
                               permission=AccountSasPermissions(read=True, write=True, add=True, update=True,
                                                                list=True, delete=True),
                               expiry=datetime.now(UTC) + timedelta(hours=1))
    text = f"TableEndpoint={account.table.url};QueueEndpoint={account.queue.url};SharedAccessSignature={sas}"
    settings = Settings.from_env({"AzureWebJobsStorage": text, "TABLE_PREFIX": storage_settings.table_prefix})
    table = table_client(settings, "sas")
    ensure_table(table)
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "v": 1})
    assert table.get_entity("p", "r")["v"] == 1 and [e["v"] for e in table.query_partition("p")] == [1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: list[str] = []          # what each request gets: "ok", "chunked", "close", "503"
    seen: list[tuple[int, str]] = []

    def do_GET(self) -> None:
        self.seen.append((self.client_address[1], self.path))   # the client port: one per connection
        step = self.script.pop(0) if self.script else "ok"
        if step == "503":
            self._answer(503, b"busy")
        elif step == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif step == "close":
            self._answer(200, b"bye", close=True)
        else:
            self._answer(200, b"ok")

    def _answer(self, status: int, body: bytes, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[Connections, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"script": [], "seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    connections = Connections(Origin("http", "127.0.0.1", httpd.server_address[1]), connect_timeout_s=2,
                              read_timeout_s=5)
    yield connections, handler
    connections.close()
    httpd.shutdown()
    httpd.server_close()


def test_requests_share_a_kept_alive_connection_and_survive_its_close(
        server: tuple[Connections, type[_Handler]]) -> None:
    connections, handler = server
    handler.script[:] = ["ok", "chunked", "close", "ok"]
    answers = [connections.request("GET", f"/{n}", {}) for n in range(4)]
    assert [a.body for a in answers] == [b"ok", b"hello chunked world", b"bye", b"ok"]
    first, second, third, fourth = (conn for conn, _path in handler.seen)
    assert first == second == third != fourth     # one connection until the server closed it


def test_a_connection_the_server_dropped_while_idle_is_replaced(
        server: tuple[Connections, type[_Handler]]) -> None:
    connections, handler = server
    assert connections.request("GET", "/a", {}).body == b"ok"
    [conn] = connections._idle                    # the one kept-alive connection, idle
    conn.sock.shutdown(socket.SHUT_RDWR)           # as if the server's keep-alive timer closed it
    assert connections.request("GET", "/b", {}).body == b"ok"
    assert len({c for c, _ in handler.seen}) == 2


def test_retries_follow_the_policy_then_give_the_last_answer(server: tuple[Connections, type[_Handler]]) -> None:
    connections, handler = server
    waits: list[float] = []
    handler.script[:] = ["503", "503", "ok"]
    policy = RetryPolicy.exponential(total=3, factor_s=0.5)
    assert policy.run(lambda: connections.request("GET", "/", {}), sleep=waits.append).status == 200
    assert waits == [0.0, 1.0]                      # at once, then factor * 2
    handler.script[:] = ["503"] * 3
    assert RetryPolicy.exponential(total=2).run(lambda: connections.request("GET", "/", {}),
                                                sleep=waits.append).status == 503


def test_an_unreachable_endpoint_is_an_azure_error_after_the_retries(storage_settings: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]               # bound, not listening: connections are refused
        key = base64.b64encode(b"k").decode()
        settings = Settings.from_env({"AzureWebJobsStorage": f"DefaultEndpointsProtocol=http;AccountName=a;"
                                      f"AccountKey={key};TableEndpoint=http://127.0.0.1:{port}/a;"
                                      f"QueueEndpoint=http://127.0.0.1:{port}/a"})
        table = table_client(settings, "gone", retry_total=1, retry_backoff_factor=0)
        with pytest.raises(ServiceRequestError):
            table.get_entity("p", "r")
    with pytest.raises(ConnectionFailed):
        Connections(Origin("http", "127.0.0.1", port), connect_timeout_s=1, read_timeout_s=1).request("GET", "/", {})


def test_short_lived_threads_reuse_the_kept_alive_connections(server: tuple[Connections, type[_Handler]]) -> None:
    # A folder round's page reader is a thread of its own: each used to open (and keep) a connection.
    connections, handler = server
    for n in range(3):
        thread = threading.Thread(target=connections.request, args=("GET", f"/{n}", {}))
        thread.start()
        thread.join()
    assert len(handler.seen) == 3 and len({port for port, _ in handler.seen}) == 1
