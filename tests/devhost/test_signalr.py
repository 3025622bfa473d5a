"""The devhost's Azure SignalR (serverless) emulation.

Two clients: the unmodified ``@microsoft/signalr`` npm client under Node
(the acceptance test: it is what the page uses), and a Python WebSocket
client speaking the JSON hub protocol byte by byte, for the protocol's
edges (handshake errors, pings, close, auth).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from devhost import signalr as signalr_api
from devhost.services.process import ROOT, ServiceError, free_port
from devhost.services.signalr_service import start_signalr_service
from devhost.signalr import verify_token
from tests.devhost.conftest import Hosted, HostFactory

SIGNALR = frozenset({"negotiate", "notify"})
RS = "\x1e"
NODE_CLIENT = Path(__file__).parent / "js" / "signalr_client.cjs"


def negotiate(host: Hosted, user: str | None) -> dict[str, str]:
    headers = {"x-ms-signalr-userid": user} if user else {}
    response = requests.post(host.url("/api/negotiate"), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def notify(host: Hosted, payload: Any) -> None:
    response = requests.post(host.url("/api/notify"), data=json.dumps(payload), timeout=10)
    assert response.status_code == 202, response.text


class ProtocolClient:
    """A minimal JSON-hub-protocol client on aiohttp, run on its own loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    def run(self, coroutine: Any, timeout: float = 15) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _connect(self, info: dict[str, str], protocol: str) -> str:
        self.session = aiohttp.ClientSession()
        auth = {"Authorization": f"Bearer {info['accessToken']}"}
        url = info["url"]
        negotiate_url = url.replace("/client/?", "/client/negotiate?") + "&negotiateVersion=1"
        async with self.session.post(negotiate_url, headers=auth) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert body["negotiateVersion"] == 1
        assert body["availableTransports"] == [{"transport": "WebSockets", "transferFormats": ["Text"]}]
        ws_url = url.replace("http", "ws", 1) + f"&id={body['connectionToken']}&access_token={info['accessToken']}"
        self.ws = await self.session.ws_connect(ws_url)
        await self.ws.send_str(json.dumps({"protocol": protocol, "version": 1}) + RS)
        reply = await self.ws.receive(timeout=10)
        return str(reply.data)

    def connect(self, info: dict[str, str], protocol: str = "json") -> str:
        return str(self.run(self._connect(info, protocol)))

    async def _records(self, timeout: float) -> list[dict[str, Any]]:
        assert self.ws is not None
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return [{"ws": msg.type.name}]
        return [json.loads(r) for r in str(msg.data).split(RS) if r]

    def receive(self, timeout: float = 10) -> list[dict[str, Any]]:
        return list(self.run(self._records(timeout), timeout + 5))

    def invocation(self, timeout: float = 10) -> dict[str, Any]:
        """The next invocation, skipping pings."""
        while True:
            for record in self.receive(timeout):
                if record.get("type") != 6:
                    return record

    def nothing_within(self, seconds: float) -> bool:
        try:
            records = self.receive(seconds)
        except TimeoutError:
            return True
        return all(r.get("type") == 6 for r in records)

    def send(self, record: dict[str, Any]) -> None:
        assert self.ws is not None
        self.run(self.ws.send_str(json.dumps(record) + RS))

    def close(self) -> None:
        async def shutdown() -> None:
            if self.ws is not None:
                await self.ws.close()
            if self.session is not None:
                await self.session.close()
        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def clients() -> Iterator[list[ProtocolClient]]:
    made: list[ProtocolClient] = []
    yield made
    for client in made:
        client.close()


def new_client(clients: list[ProtocolClient]) -> ProtocolClient:
    client = ProtocolClient()
    clients.append(client)
    return client


def test_negotiate_binding_gives_url_and_token_for_the_user(host_sample: HostFactory) -> None:
    host = host_sample(functions=SIGNALR)
    info = negotiate(host, "account-1")
    assert info["url"] == host.url("/signalr/client/?hub=testhub")
    claims = verify_token(host.handle.devhost.signalr._key, info["accessToken"])
    assert claims["nameid"] == "account-1"
    assert claims["aud"] == info["url"]


def test_missing_user_header_fails_the_binding_like_azure(host_sample: HostFactory) -> None:
    host = host_sample(functions=SIGNALR)
    response = requests.post(host.url("/api/negotiate"), timeout=10)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "binding_error"


def test_output_binding_reaches_only_the_addressed_user(host_sample: HostFactory,
                                                       clients: list[ProtocolClient]) -> None:
    host = host_sample(functions=SIGNALR)
    alice, bob = new_client(clients), new_client(clients)
    assert alice.connect(negotiate(host, "alice")) == "{}" + RS
    assert bob.connect(negotiate(host, "bob")) == "{}" + RS
    notify(host, {"target": "syncProgress", "userId": "alice", "arguments": [{"phase": "initial", "done": 3}]})
    assert alice.invocation() == {"type": 1, "target": "syncProgress", "arguments": [{"phase": "initial", "done": 3}]}
    assert bob.nothing_within(0.5)
    # A list of messages, one without a user: a broadcast to the hub.
    notify(host, [{"target": "hello", "arguments": ["all"]}, {"Target": "only", "UserId": "bob", "Arguments": [1]}])
    assert alice.invocation()["target"] == "hello"
    assert [bob.invocation()["target"], bob.invocation()["target"]] == ["hello", "only"]
    # A closed connection leaves the service's index of the user's connections.
    service = host.handle.devhost.signalr
    assert service.user_connection_count("testhub", "alice") == 1
    alice.close()
    clients.remove(alice)
    deadline = time.monotonic() + 10
    while service.user_connection_count("testhub", "alice") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.user_connection_count("testhub", "alice") == 0
    assert service.user_connection_count("testhub", "bob") == 1


def test_group_actions_then_group_message(host_sample: HostFactory, clients: list[ProtocolClient]) -> None:
    host = host_sample(functions=SIGNALR)
    alice, bob = new_client(clients), new_client(clients)
    alice.connect(negotiate(host, "alice"))
    bob.connect(negotiate(host, "bob"))
    notify(host, {"userId": "bob", "groupName": "admins", "action": "add"})
    notify(host, {"target": "toGroup", "groupName": "admins", "arguments": []})
    assert bob.invocation()["target"] == "toGroup"
    assert alice.nothing_within(0.5)


def test_bad_output_fails_the_invocation(host_sample: HostFactory) -> None:
    host = host_sample(functions=SIGNALR)
    for bad in ({"arguments": []}, {"target": "x", "arguments": "not a list"}, "not json"):
        body = bad if isinstance(bad, str) else json.dumps(bad)
        response = requests.post(host.url("/api/notify"), data=body, timeout=10)
        assert response.status_code == 500, bad


def test_in_process_publish_and_rest_api(host_sample: HostFactory, clients: list[ProtocolClient]) -> None:
    host = host_sample(functions=SIGNALR)
    client = new_client(clients)
    client.connect(negotiate(host, "carol"))
    # From any thread of the devhost process:
    threading.Thread(target=signalr_api.publish, args=("testhub", "fromPython", [42]),
                     kwargs={"user_id": "carol"}).start()
    assert client.invocation() == {"type": 1, "target": "fromPython", "arguments": [42]}
    # Azure SignalR's REST API, with a token signed by the AccessKey, as a server SDK would.
    url = host.url("/signalr/api/v1/hubs/testhub/users/carol")
    token = host.handle.devhost.signalr.rest_token(url)
    response = requests.post(url, json={"target": "fromRest", "arguments": ["x"]},
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 202
    assert client.invocation()["target"] == "fromRest"
    assert requests.post(url, json={"target": "t", "arguments": []}, timeout=10).status_code == 401
    wrong_audience = host.handle.devhost.signalr.rest_token(host.url("/signalr/api/v1/hubs/testhub"))
    assert requests.post(url, json={"target": "t", "arguments": []},
                         headers={"Authorization": f"Bearer {wrong_audience}"}, timeout=10).status_code == 401


def test_protocol_edges(host_sample: HostFactory, clients: list[ProtocolClient]) -> None:
    host = host_sample(functions=SIGNALR)
    info = negotiate(host, "dave")
    negotiate_url = info["url"].replace("/client/?", "/client/negotiate?")
    assert requests.post(negotiate_url, timeout=10).status_code == 401
    assert requests.post(negotiate_url, headers={"Authorization": "Bearer forged.token.value"},
                         timeout=10).status_code == 401
    other_hub = negotiate_url.replace("hub=testhub", "hub=otherhub")
    assert requests.post(other_hub, headers={"Authorization": f"Bearer {info['accessToken']}"},
                         timeout=10).status_code == 401
    ws_url = info["url"] + f"&id=unknown&access_token={info['accessToken']}"
    assert requests.get(ws_url, timeout=10).status_code == 404

    msgpack = new_client(clients)
    assert "not available" in msgpack.connect(info, protocol="messagepack")

    client = new_client(clients)
    client.connect(negotiate(host, "dave"))
    client.send({"type": 6})  # a ping is fine
    client.send({"type": 1, "invocationId": "7", "target": "ServerMethod", "arguments": []})
    completion = client.invocation()
    assert completion["type"] == 3 and completion["invocationId"] == "7" and "error" in completion
    client.send({"type": 7})
    assert client.receive()[0]["ws"] in ("CLOSE", "CLOSED")


def test_shutdown_sends_close_allowing_reconnect(host_sample: HostFactory, clients: list[ProtocolClient]) -> None:
    host = host_sample(functions=SIGNALR)
    client = new_client(clients)
    client.connect(negotiate(host, "erin"))
    host.stop(0)
    assert client.invocation() == {"type": 7, "error": "Server is shutting down.", "allowReconnect": True}


class NodeClient:
    def __init__(self, base_url: str, user: str, targets: str) -> None:
        self.process = subprocess.Popen(["node", str(NODE_CLIENT), base_url, user, targets], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)

    def next_event(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"node client exited: {self.process.stderr.read() if self.process.stderr else ''}")
        return json.loads(line)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def test_unmodified_npm_signalr_client_connects_and_receives(host_sample: HostFactory) -> None:
    host = host_sample(functions=SIGNALR)
    node = NodeClient(host.base_url, "frank", "syncProgress,messagesChanged")
    try:
        connected = node.next_event()
        assert connected["event"] == "connected", connected
        assert host.handle.devhost.signalr.user_connection_count("testhub", "frank") == 1
        notify(host, {"target": "syncProgress", "userId": "frank", "arguments": [{"phase": "initial", "indexed": 50}]})
        notify(host, {"target": "syncProgress", "userId": "someone-else", "arguments": [{"phase": "nope"}]})
        notify(host, {"target": "messagesChanged", "userId": "frank", "arguments": [{"upserted": ["m1"]}]})
        assert node.next_event() == {"event": "message", "target": "syncProgress",
                                     "args": [{"phase": "initial", "indexed": 50}]}
        assert node.next_event() == {"event": "message", "target": "messagesChanged", "args": [{"upserted": ["m1"]}]}
    finally:
        node.stop()


def test_a_second_devhost_forwards_to_the_configured_service(host_sample: HostFactory,
                                                             clients: list[ProtocolClient]) -> None:
    """A worker process's output binding reaches clients connected to the HTTP process, through the
    REST API of the service named in AzureSignalRConnectionString (as in Azure, where it is central)."""
    port = free_port()
    connection = f"Endpoint=http://localhost:{port}/signalr;AccessKey=shared-secret;Version=1.0;"
    service = host_sample(functions=SIGNALR, settings={"AzureSignalRConnectionString": connection}, port=port)
    worker = host_sample(functions=SIGNALR, settings={"AzureSignalRConnectionString": connection})
    assert service.handle.devhost.signalr.remote_endpoint is None  # it is the service
    assert worker.handle.devhost.signalr.remote_endpoint == f"http://localhost:{port}/signalr"
    client = new_client(clients)
    info = negotiate(worker, "gina")  # the binding in the worker points clients at the service
    assert info["url"] == f"http://localhost:{port}/signalr/client/?hub=testhub"
    client.connect(info)
    notify(worker, {"userId": "gina", "groupName": "g1", "action": "add"})
    notify(worker, {"target": "viaRest", "groupName": "g1", "arguments": [1]})
    assert client.invocation() == {"type": 1, "target": "viaRest", "arguments": [1]}
    service.stop(0)
    response = requests.post(worker.url("/api/notify"), data=json.dumps({"target": "x", "arguments": []}),
                             timeout=20)
    assert response.status_code == 500  # the service is gone: the invocation fails (and would be retried)


def test_the_service_as_its_own_process_serves_a_devhost_and_its_clients(
        host_sample: HostFactory, clients: list[ProtocolClient], tmp_path: Path) -> None:
    """``python -m devhost.signalr_server`` (the benchmarks' stand-in for Azure SignalR Service): a
    devhost forwards to it, its clients negotiate with it, and a message reaches every connection of
    the addressed user, and only those; the user's other connection keeps receiving once one closed."""
    service = start_signalr_service(tmp_path / "signalr.log", "process-secret")
    try:
        host = host_sample(functions=SIGNALR, settings={"AzureSignalRConnectionString": service.connection_string})
        assert host.handle.devhost.signalr.remote_endpoint == service.endpoint
        alice_tab, alice_phone, bob = new_client(clients), new_client(clients), new_client(clients)
        info = negotiate(host, "alice")
        assert info["url"] == f"{service.endpoint}/client/?hub=testhub"
        alice_tab.connect(info)
        alice_phone.connect(negotiate(host, "alice"))
        bob.connect(negotiate(host, "bob"))
        notify(host, {"target": "changed", "userId": "alice", "arguments": [1]})
        assert alice_tab.invocation()["arguments"] == [1]
        assert alice_phone.invocation()["arguments"] == [1]
        assert bob.nothing_within(0.5)
        alice_phone.close()
        clients.remove(alice_phone)
        notify(host, {"target": "changed", "userId": "alice", "arguments": [2]})
        assert alice_tab.invocation()["arguments"] == [2]
        notify(host, {"target": "changed", "connectionId": "not-a-connection", "arguments": [3]})
        notify(host, {"target": "everyone", "arguments": [4]})
        assert alice_tab.invocation()["target"] == "everyone"   # not the one to an unknown connection
        assert bob.invocation()["target"] == "everyone"
    finally:
        service.stop()
    assert not service.alive()


def test_the_service_process_needs_its_access_key(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="SIGNALR_ACCESS_KEY"):
        start_signalr_service(tmp_path / "signalr.log", "")


def test_negotiate_allows_cross_origin_pages(host_sample: HostFactory) -> None:
    """The page may come from another origin (localhost vs 127.0.0.1, a static web app): CORS as the service."""
    host = host_sample(functions=SIGNALR)
    info = negotiate(host, "hana")
    negotiate_url = info["url"].replace("/client/?", "/client/negotiate?") + "&negotiateVersion=1"
    origin = "http://localhost:4280"
    preflight = requests.options(negotiate_url, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,x-signalr-user-agent"}, timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization,x-signalr-user-agent"
    ok = requests.post(negotiate_url, headers={"Origin": origin, "Authorization": f"Bearer {info['accessToken']}"},
                       timeout=10)
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == origin
    denied = requests.post(negotiate_url, headers={"Origin": origin}, timeout=10)
    assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"] == origin
