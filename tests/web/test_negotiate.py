"""POST /api/negotiate: connection info for the bearer's own account, and only with a valid bearer.

Over HTTP against the devhost (its SignalR emulation is the service), plus
the identity-based minting path against a local stand-in for Azure
SignalR's ``:generateToken`` (the one edge we cannot reach from here).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest
import requests

from devhost.services.process import free_port
from devhost.signalr import sign_token, verify_token
from mailsync.errors import ConfigurationError, DependencyUnavailable, InputError
from mailsync.realtime.connection_info import KeySignedConnections, connections_from_settings
from mailsync.realtime.service_tokens import ServiceIssuedConnections
from mailsync.settings import Settings
from tests.web.conftest import SIGNALR_KEY, WebHost, web_host_fixture

FUNCTIONS = ["oauth_start", "account_get", "account_delete", "signalr_negotiate"]
RS = "\x1e"


web = web_host_fixture(FUNCTIONS)


def negotiate(web: WebHost, token: str | None, **kwargs: Any) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{web.api}/negotiate", headers=headers, timeout=30, **kwargs)


def claims_of(token: str) -> dict[str, Any]:
    return verify_token(SIGNALR_KEY.encode(), token)


def test_connection_info_names_the_tokens_account(web: WebHost) -> None:
    account_id, token = web.create_account()
    answer = negotiate(web, token, params={"negotiateVersion": "1"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    info = answer.json()
    assert set(info) == {"url", "accessToken"}
    assert info["url"] == f"{web.host.base_url}/signalr/client/?hub=mailsync"
    claims = claims_of(info["accessToken"])
    assert claims["nameid"] == account_id
    assert claims["aud"] == info["url"]
    assert claims["exp"] - claims["iat"] == 3600


def test_a_client_cannot_choose_its_user_id(web: WebHost) -> None:
    account_id, token = web.create_account()
    other_id, _ = web.create_account()
    answer = negotiate(web, token, headers={"x-ms-signalr-userid": other_id},
                       params={"userId": other_id}, json={"userId": other_id, "account_id": other_id})
    assert answer.status_code == 200, answer.text
    assert claims_of(answer.json()["accessToken"])["nameid"] == account_id


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer  ", "Basic abc", "Bearer garbage",
                                           "Bearer abc.def", "Bearer a:b.c", "Bearer " + "a" * 300 + ".b"])
def test_missing_or_malformed_token_is_401(web: WebHost, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    answer = negotiate(web, None, headers=headers)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] == "unauthorized"
    assert "accessToken" not in answer.text


def test_wrong_secret_and_deleted_account_are_401(web: WebHost) -> None:
    account_id, token = web.create_account()
    assert negotiate(web, f"{account_id}.not-the-secret").status_code == 401
    assert negotiate(web, token[:-1] + ("A" if token[-1] != "A" else "B")).status_code == 401
    deleted = requests.delete(f"{web.api}/accounts/{account_id}", headers={"Authorization": f"Bearer {token}"},
                              timeout=30)
    assert deleted.status_code == 204, deleted.text
    assert negotiate(web, token).status_code == 401


async def _publish(session: aiohttp.ClientSession, base_url: str, user_id: str, target: str, payload: Any) -> None:
    url = f"{base_url}/signalr/api/v1/hubs/mailsync/users/{user_id}"
    rest = sign_token(SIGNALR_KEY.encode(), {"aud": url, "exp": 4_102_444_800})
    async with session.post(url, json={"target": target, "arguments": [payload]},
                            headers={"Authorization": f"Bearer {rest}"}) as response:
        assert response.status == 202, await response.text()


async def _connect(session: aiohttp.ClientSession, info: dict[str, str]) -> aiohttp.ClientWebSocketResponse:
    """What @microsoft/signalr does with a negotiate redirect: negotiate at the service, open the socket."""
    base, _, query = info["url"].partition("?")
    auth = {"Authorization": f"Bearer {info['accessToken']}"}
    async with session.post(f"{base.rstrip('/')}/negotiate?{query}&negotiateVersion=1", headers=auth) as response:
        assert response.status == 200, await response.text()
        negotiated = await response.json()
    ws_url = f"{info['url'].replace('http://', 'ws://')}&id={negotiated['connectionToken']}" \
             f"&access_token={info['accessToken']}"
    ws = await session.ws_connect(ws_url)
    await ws.send_str(json.dumps({"protocol": "json", "version": 1}) + RS)
    assert (await ws.receive_str(timeout=10)) == "{}" + RS
    return ws


async def _next_invocation(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:
        for frame in (await ws.receive_str(timeout=10)).split(RS):
            if frame and json.loads(frame).get("type") == 1:
                return json.loads(frame)  # type: ignore[no-any-return]


def test_the_connection_receives_its_own_accounts_events_only(web: WebHost) -> None:
    mine, token = web.create_account()
    other, other_token = web.create_account()
    info = negotiate(web, token).json()
    other_info = negotiate(web, other_token).json()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            ws = await _connect(session, info)
            other_ws = await _connect(session, other_info)
            await _publish(session, web.host.base_url, other, "syncProgress", {"account_id": other})
            await _publish(session, web.host.base_url, mine, "messagesChanged", {"account_id": mine})
            got, other_got = await _next_invocation(ws), await _next_invocation(other_ws)
            await ws.close()
            await other_ws.close()
            return got, other_got

    # In a thread of its own: Playwright's sync API (other tests of the session) keeps a loop
    # running on the main thread, where asyncio.run() refuses to start another.
    with ThreadPoolExecutor(max_workers=1) as pool:
        got, other_got = pool.submit(asyncio.run, scenario()).result(timeout=60)
    assert got["target"] == "messagesChanged" and got["arguments"] == [{"account_id": mine}]
    assert other_got["target"] == "syncProgress" and other_got["arguments"] == [{"account_id": other}]


# -- minting, without HTTP ----------------------------------------------------------------------

def test_settings_choose_the_minting_path() -> None:
    with pytest.raises(ConfigurationError, match="no SignalR service configured"):
        connections_from_settings(Settings.from_env({}))
    keyed = connections_from_settings(Settings.from_env(
        {"AzureSignalRConnectionString": "Endpoint=https://x.service.signalr.net;AccessKey=k;Port=8443;Version=1.0;",
         "SIGNALR_HUB": "MailSync"}))
    assert isinstance(keyed, KeySignedConnections)
    assert keyed.connection_info("acc1").url == "https://x.service.signalr.net:8443/client/?hub=mailsync"
    identity = connections_from_settings(Settings.from_env(
        {"AzureSignalRConnectionString__serviceUri": "https://x.service.signalr.net",
         "AzureSignalRConnectionString__clientId": "00000000-0000-0000-0000-000000000001"}))
    assert isinstance(identity, ServiceIssuedConnections)


def test_key_signed_tokens() -> None:
    connections = KeySignedConnections("http://127.0.0.1:1/signalr", "secret", "mailsync", clock=lambda: 1_000.0)
    info = connections.connection_info("acc42")
    claims = verify_token(b"secret", info.access_token, now=1_500.0)
    assert claims == {"aud": info.url, "iat": 1000, "nbf": 1000, "exp": 4600, "nameid": "acc42"}
    with pytest.raises(PermissionError):
        verify_token(b"other key", info.access_token, now=1_500.0)
    for bad in ("", "x" * 129, "line\nbreak"):
        with pytest.raises(InputError):
            connections.connection_info(bad)


class _ServiceStandIn(BaseHTTPRequestHandler):
    """Answers POST /api/hubs/{hub}/:generateToken like the service; the status comes from the test."""

    status = 200
    seen: list[tuple[str, dict[str, list[str]], str]] = []

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        type(self).seen.append((parts.path, parse_qs(parts.query), self.headers.get("Authorization", "")))
        body = orjson.dumps({"token": "issued." + base64.b64encode(b"x").decode()}) if self.status == 200 \
            else b'{"code":"Forbidden"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[tuple[str, type[_ServiceStandIn]]]:
    handler = type("Handler", (_ServiceStandIn,), {"seen": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_service_issued_tokens(service: tuple[str, type[_ServiceStandIn]]) -> None:
    url, handler = service
    connections = ServiceIssuedConnections(url, "MailSync", lambda: "entra-token")
    info = connections.connection_info("acc7")
    assert info.url == f"{url}/client/?hub=mailsync" and info.access_token == "issued.eA=="
    path, query, auth = handler.seen[-1]
    assert path == "/api/hubs/mailsync/:generateToken"
    assert query == {"userId": ["acc7"], "minutesToExpire": ["60"], "api-version": ["2024-12-01"]}
    assert auth == "Bearer entra-token"

    handler.status = 403
    with pytest.raises(ConfigurationError, match="refused our identity"):
        connections.connection_info("acc7")
    handler.status = 503
    with pytest.raises(DependencyUnavailable):
        connections.connection_info("acc7")
    unreachable = ServiceIssuedConnections(f"http://127.0.0.1:{free_port()}", "mailsync", lambda: "t")
    with pytest.raises(DependencyUnavailable):
        unreachable.connection_info("acc7")
