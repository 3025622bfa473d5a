"""Azure SignalR Service, serverless mode, emulated inside the devhost.

No SignalR emulator runs on Linux without .NET, so the devhost speaks the
service's client protocol itself — enough for the unmodified
``@microsoft/signalr`` client — and implements the two Functions bindings
that talk to it. The service lives under ``/signalr`` of the devhost, which
plays the role of the ``Endpoint`` of a connection string
(``Endpoint=http://127.0.0.1:7071/signalr;AccessKey=...;Version=1.0;``)::

    browser                          devhost
    POST /api/negotiate  ──────────▶ function with the signalRConnectionInfo input binding
                         ◀────────── {"url": ".../signalr/client/?hub=h", "accessToken": JWT(nameid=userId)}
    POST <url>/negotiate ──────────▶ (bearer JWT) {"negotiateVersion": 1, "connectionId", "connectionToken",
                                                   "availableTransports": [WebSockets/Text]}
    GET  <url>&id=<connectionToken>&access_token=JWT   (WebSocket upgrade)
         {"protocol":"json","version":1}\x1e ──▶
                                    ◀── {}\x1e                         handshake done
                                    ◀── {"type":1,"target":...,"arguments":[...]}\x1e   invocations
                                    ◀─▶ {"type":6}\x1e                 pings every 15 s
                                    ◀── {"type":7,"error":...,"allowReconnect":true}\x1e  close

Messages reach clients three ways, all ending in :meth:`SignalRService.send`:
the ``signalR`` output binding of a function, the service's REST API
(``POST /signalr/api/v1/hubs/{hub}[/users/{id}|/groups/{g}|/connections/{id}]``,
bearer JWT signed with the AccessKey, as Azure's), and :func:`publish` for
Python code running in the devhost process.

Access tokens are HS256 JWTs signed with the connection string's AccessKey
(a random per-process key when none is configured); ``nameid`` carries the
user id, as in Azure. A client only receives messages addressed to the
hub, its user id, a group it joined, or its connection id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlparse, urlsplit

import orjson
from aiohttp import WSMsgType, web

from mailsync.keepalive_http import BodyTooLarge, ConnectionFailed, Connections, Origin

log = logging.getLogger("devhost.signalr")

RS = "\x1e"
PATH = "/signalr"
TOKEN_LIFETIME_S = 3600
PENDING_CONNECTION_S = 60
PING_INTERVAL_S = 15.0
CLIENT_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 15.0
MAX_QUEUED_FRAMES = 5000
REST_TIMEOUT_S = 10.0
MAX_REST_ANSWER_BYTES = 64 * 1024   # the service answers 202 with no body, an error with a short one

INVOCATION, COMPLETION, PING, CLOSE = 1, 3, 6, 7


class SignalRError(Exception):
    """A malformed SignalR output message or group action."""


# -- access tokens ---------------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(key: bytes, claims: Mapping[str, Any]) -> str:
    """An HS256 JWT, the token format Azure SignalR issues and accepts."""
    header = _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64url(orjson.dumps(dict(claims)))
    signature = hmac.new(key, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def verify_token(key: bytes, token: str, *, now: float | None = None) -> dict[str, Any]:
    """The token's claims, or PermissionError if the signature or expiry is wrong."""
    try:
        header, payload, signature = token.split(".")
        expected = hmac.new(key, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64url(signature)):
            raise PermissionError("bad token signature")
        if orjson.loads(_unb64url(header)).get("alg") != "HS256":
            raise PermissionError("unsupported token algorithm")
        claims = orjson.loads(_unb64url(payload))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise PermissionError("malformed token") from exc
    if not isinstance(claims, dict):
        raise PermissionError("malformed token")
    if float(claims.get("exp", 0)) < (now if now is not None else time.time()):
        raise PermissionError("token expired")
    return claims


def parse_connection_string(value: str) -> dict[str, str]:
    """``Endpoint=...;AccessKey=...;Version=1.0;`` as a dict with lower-case keys."""
    parts = (p.partition("=") for p in value.split(";") if p.strip())
    return {k.strip().lower(): v.strip() for k, sep, v in parts if sep}


# -- messages ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SignalRMessage:
    """One invocation to send: to everyone in the hub, or to one user / group / connection."""

    target: str
    arguments: list[Any] = field(default_factory=list)
    user_id: str | None = None
    group_name: str | None = None
    connection_id: str | None = None


@dataclass(frozen=True)
class GroupAction:
    """Add or remove a user or connection to/from a group (``removeAll``: a user from every group)."""

    action: str
    group_name: str | None = None
    user_id: str | None = None
    connection_id: str | None = None


def _item(raw: Any) -> SignalRMessage | GroupAction:
    if not isinstance(raw, dict):
        raise SignalRError("a SignalR output item must be a JSON object")
    item = {str(k).lower(): v for k, v in raw.items()}  # Azure reads these case-insensitively
    for key in ("userid", "groupname", "connectionid"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise SignalRError(f"SignalR output {key} must be a string")
    if "action" in item:
        action = str(item["action"]).lower()
        if action not in ("add", "remove", "removeall"):
            raise SignalRError(f"unknown SignalR group action {item['action']!r}")
        if not item.get("userid") and not item.get("connectionid"):
            raise SignalRError("a SignalR group action needs userId or connectionId")
        if action != "removeall" and not item.get("groupname"):
            raise SignalRError("a SignalR group action needs groupName")
        return GroupAction(action=action, group_name=item.get("groupname"), user_id=item.get("userid"),
                           connection_id=item.get("connectionid"))
    target = item.get("target")
    if not isinstance(target, str) or not target:
        raise SignalRError("a SignalR message needs a non-empty string target")
    arguments = item.get("arguments")
    if arguments is None:
        arguments = []
    if not isinstance(arguments, list):
        raise SignalRError("SignalR message arguments must be a JSON array")
    return SignalRMessage(target=target, arguments=arguments, user_id=item.get("userid"),
                          group_name=item.get("groupname"), connection_id=item.get("connectionid"))


def parse_output(value: Any) -> list[SignalRMessage | GroupAction]:
    """Messages and group actions from a ``signalR`` output value.

    Like Azure's Python worker, the binding takes a JSON string (or bytes)
    holding one object or an array of them; a dict set directly would fail
    in Azure, so it fails here too.
    """
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8")
    if not isinstance(value, str):
        raise SignalRError(f"a signalR output takes a JSON string (json.dumps(...)), not {type(value).__name__}")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise SignalRError(f"signalR output is not JSON: {exc}") from exc
    items = doc if isinstance(doc, list) else [doc]
    return [_item(raw) for raw in items]


# -- the service ------------------------------------------------------------------------------------

@dataclass
class _Connection:
    id: str
    hub: str
    user_id: str | None
    ws: web.WebSocketResponse
    outbox: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED_FRAMES))
    groups: set[str] = field(default_factory=set)


@dataclass
class _Pending:
    connection_id: str
    hub: str
    user_id: str | None
    expires: float


def _frame(doc: Mapping[str, Any]) -> str:
    return orjson.dumps(doc).decode() + RS


class SignalRService:
    """Hubs, connections and delivery for one devhost."""

    def __init__(self, access_key: str | None = None, endpoint: str | None = None) -> None:
        self._key = (access_key or secrets.token_urlsafe(32)).encode("utf-8")
        self._endpoint = endpoint.rstrip("/") if endpoint else None
        self._remote: str | None = None  # set by attach() when the endpoint is another process
        self._forwarding: Connections | None = None   # kept-alive connections to a remote service's REST API
        self._pending: dict[str, _Pending] = {}
        self._connections: dict[str, _Connection] = {}
        # A user's connections by (hub, user id): mailsync addresses every message to one user (the
        # account), and scanning every connection per message cost ~0.3 ms at 1,000 clients.
        self._by_user: dict[tuple[str, str | None], dict[str, _Connection]] = {}
        self._user_groups: dict[tuple[str, str], set[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.delivered = 0  # invocation frames queued to clients, for tests and benchmarks

    @classmethod
    def from_settings(cls, settings: Mapping[str, str],
                      setting: str = "AzureSignalRConnectionString") -> SignalRService:
        parsed = parse_connection_string(settings.get(setting) or "")
        return cls(parsed.get("accesskey") or None, parsed.get("endpoint") or None)

    @property
    def remote_endpoint(self) -> str | None:
        """The service this devhost forwards to, or None when it is the service itself."""
        return self._remote

    # Tokens and connection info.

    def connection_info(self, hub: str, user_id: str | None, endpoint: str) -> dict[str, str]:
        """What the ``signalRConnectionInfo`` input binding gives the function.

        ``endpoint`` is this devhost's /signalr as the caller reached it; a
        remote service (another devhost, or Azure) is used instead when the
        connection string names one.
        """
        hub = hub.lower()
        url = f"{(self._remote or endpoint).rstrip('/')}/client/?hub={quote(hub)}"
        now = int(time.time())
        claims: dict[str, Any] = {"aud": url, "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME_S}
        if user_id:
            claims["nameid"] = user_id
        return {"url": url, "accessToken": sign_token(self._key, claims)}

    def rest_token(self, url: str, lifetime_s: int = TOKEN_LIFETIME_S) -> str:
        """A bearer token for the REST API at ``url`` (what a server SDK signs with the AccessKey)."""
        now = int(time.time())
        return sign_token(self._key, {"aud": url, "iat": now, "exp": now + lifetime_s})

    def _client_claims(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        token = request.query.get("access_token") or ""
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
        if not token:
            raise web.HTTPUnauthorized(text="missing access token")
        try:
            claims = verify_token(self._key, token)
        except PermissionError as exc:
            raise web.HTTPUnauthorized(text=str(exc)) from exc
        hub = (request.query.get("hub") or "").lower()
        audience = urlparse(str(claims.get("aud", "")))
        token_hub = (parse_qs(audience.query).get("hub") or [""])[0].lower()
        if not hub or audience.path.rstrip("/") != f"{PATH}/client" or token_hub != hub:
            raise web.HTTPUnauthorized(text="token is not valid for this hub")
        return hub, claims

    # Delivery.

    def _targets(self, hub: str, message: SignalRMessage) -> Iterator[_Connection]:
        if message.connection_id is not None:
            connection = self._connections.get(message.connection_id)
            if connection is not None and connection.hub == hub:
                yield connection
            return
        if message.user_id is not None:
            yield from self._by_user.get((hub, message.user_id), {}).values()
            return
        for connection in self._connections.values():
            if connection.hub != hub:
                continue
            if message.group_name is not None:
                user_groups = self._user_groups.get((hub, connection.user_id or ""), set())
                if message.group_name in connection.groups or message.group_name in user_groups:
                    yield connection
            else:
                yield connection

    def _add_connection(self, connection: _Connection) -> None:
        self._connections[connection.id] = connection
        self._by_user.setdefault((connection.hub, connection.user_id), {})[connection.id] = connection

    def _remove_connection(self, connection: _Connection) -> None:
        self._connections.pop(connection.id, None)
        key = (connection.hub, connection.user_id)
        same_user = self._by_user.get(key)
        if same_user is not None:
            same_user.pop(connection.id, None)
            if not same_user:
                del self._by_user[key]

    async def send(self, hub: str, item: SignalRMessage | GroupAction) -> int:
        """Deliver a message (or apply a group action); returns how many local connections it went to."""
        hub = hub.lower()
        if self._remote is not None:
            await self._forward(hub, item)
            return 0
        if isinstance(item, GroupAction):
            self._apply(hub, item)
            return 0
        frame = _frame({"type": INVOCATION, "target": item.target, "arguments": item.arguments})
        count = 0
        for connection in list(self._targets(hub, item)):
            try:
                connection.outbox.put_nowait(frame)
                count += 1
            except asyncio.QueueFull:
                # A client that does not read is dropped (it reconnects), as the service does.
                log.warning("SignalR connection %s is not reading; closing it", connection.id)
                await connection.ws.close()
        self.delivered += count
        return count

    def _apply(self, hub: str, action: GroupAction) -> None:
        if action.user_id is not None:
            groups = self._user_groups.setdefault((hub, action.user_id), set())
            if action.action == "add":
                groups.add(action.group_name or "")
            elif action.action == "remove":
                groups.discard(action.group_name or "")
            else:
                groups.clear()
        if action.connection_id is not None:
            connection = self._connections.get(action.connection_id)
            if connection is not None and connection.hub == hub:
                if action.action == "add":
                    connection.groups.add(action.group_name or "")
                elif action.action == "remove":
                    connection.groups.discard(action.group_name or "")
                else:
                    connection.groups.clear()

    def publish(self, hub: str, target: str, arguments: list[Any], *, user_id: str | None = None,
                group_name: str | None = None, connection_id: str | None = None) -> None:
        """Send from any thread of the devhost process (fire and forget)."""
        if self._loop is None:
            raise RuntimeError("the SignalR service is not running")
        message = SignalRMessage(target=target, arguments=list(arguments), user_id=user_id,
                                 group_name=group_name, connection_id=connection_id)
        coroutine = self.send(hub, message)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._loop.create_task(coroutine)
        else:
            asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def user_connection_count(self, hub: str, user_id: str) -> int:
        return len(self._by_user.get((hub.lower(), user_id), {}))

    # HTTP endpoints.

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.post(f"{PATH}/client/negotiate", self._negotiate),
            web.options(f"{PATH}/client/negotiate", self._preflight),
            web.get(f"{PATH}/client/", self._websocket),
            web.get(f"{PATH}/client", self._websocket),
            web.post(f"{PATH}/api/v1/hubs/{{hub}}", self._rest),
            web.post(f"{PATH}/api/v1/hubs/{{hub}}/{{kind:users|groups|connections}}/{{id}}", self._rest),
            web.post(f"{PATH}/api/hubs/{{hub}}/:send", self._rest),
            web.post(f"{PATH}/api/hubs/{{hub}}/{{kind:users|groups|connections}}/{{id}}/:send", self._rest),
            web.put(f"{PATH}/api/v1/hubs/{{hub}}/groups/{{group}}/{{kind:users|connections}}/{{id}}",
                    self._rest_group),
            web.delete(f"{PATH}/api/v1/hubs/{{hub}}/groups/{{group}}/{{kind:users|connections}}/{{id}}",
                       self._rest_group),
            web.delete(f"{PATH}/api/v1/hubs/{{hub}}/users/{{id}}/groups", self._rest_group),
        ]

    def attach(self, loop: asyncio.AbstractEventLoop, own_base_url: str | None = None) -> None:
        """Start serving on ``loop``; forward to the configured endpoint unless it is this devhost."""
        self._loop = loop
        if self._endpoint and not (own_base_url and _same_service(self._endpoint, f"{own_base_url}{PATH}")):
            self._remote = self._endpoint
            log.info("SignalR: forwarding messages to the service at %s", self._remote)
        _register(self)

    async def _forward(self, hub: str, item: SignalRMessage | GroupAction) -> None:
        """Send through the service's REST API, as Azure's output binding does."""
        assert self._remote is not None
        base = f"{self._remote}/api/v1/hubs/{quote(hub, safe='')}"
        body: dict[str, Any] | None = None
        if isinstance(item, SignalRMessage):
            method = "POST"
            body = {"target": item.target, "arguments": item.arguments}
            if item.connection_id is not None:
                url = f"{base}/connections/{quote(item.connection_id, safe='')}"
            elif item.user_id is not None:
                url = f"{base}/users/{quote(item.user_id, safe='')}"
            elif item.group_name is not None:
                url = f"{base}/groups/{quote(item.group_name, safe='')}"
            else:
                url = base
        elif item.action == "removeall":
            if item.user_id is None:
                raise SignalRError("removeAll over the REST API needs a userId")
            method, url = "DELETE", f"{base}/users/{quote(item.user_id, safe='')}/groups"
        else:
            method = "PUT" if item.action == "add" else "DELETE"
            member = (f"users/{quote(item.user_id, safe='')}" if item.user_id is not None
                      else f"connections/{quote(item.connection_id or '', safe='')}")
            url = f"{base}/groups/{quote(item.group_name or '', safe='')}/{member}"
        headers = {"Authorization": f"Bearer {self.rest_token(url)}"}
        payload = b""
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = orjson.dumps(body)
        rest = self._rest_connections()
        try:
            # On the loop's executor (the host's I/O threads): a blocking kept-alive request there cost a
            # tenth of an aiohttp client request's CPU (~0.03 ms against ~0.3), and every message of
            # every invocation's output binding is one request.
            response = await asyncio.get_running_loop().run_in_executor(
                None, lambda: rest.request(method, urlsplit(url).path, headers, payload,
                                           max_bytes=MAX_REST_ANSWER_BYTES))
        except (ConnectionFailed, BodyTooLarge) as exc:
            raise SignalRError(f"cannot reach the SignalR service: {type(exc).__name__}") from exc
        if response.status >= 300:
            raise SignalRError(f"the SignalR service answered {response.status} to {method} {url}")

    def _rest_connections(self) -> Connections:
        if self._forwarding is None:
            assert self._remote is not None
            origin = Origin.of(urlsplit(self._remote))
            if origin is None:
                raise SignalRError(f"the SignalR endpoint {self._remote!r} is not an http(s) URL")
            self._forwarding = Connections(origin, connect_timeout_s=5.0, read_timeout_s=REST_TIMEOUT_S)
        return self._forwarding

    async def _preflight(self, request: web.Request) -> web.Response:
        """CORS preflight: the service accepts any origin (the page is usually elsewhere in Azure)."""
        response = web.Response(status=204)
        _allow_origin(request, response)
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "authorization, content-type, x-requested-with, x-signalr-user-agent")
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    async def _negotiate(self, request: web.Request) -> web.Response:
        try:
            response = await self._negotiate_inner(request)
        except web.HTTPException as exc:
            _allow_origin(request, exc)
            raise
        _allow_origin(request, response)
        return response

    async def _negotiate_inner(self, request: web.Request) -> web.Response:
        hub, claims = self._client_claims(request)
        now = time.time()
        for token in [t for t, p in self._pending.items() if p.expires < now]:
            del self._pending[token]
        connection_id = _b64url(uuid.uuid4().bytes)
        connection_token = secrets.token_urlsafe(24)
        self._pending[connection_token] = _Pending(connection_id, hub, claims.get("nameid"),
                                                   now + PENDING_CONNECTION_S)
        transports = [{"transport": "WebSockets", "transferFormats": ["Text"]}]
        try:
            version = int(request.query.get("negotiateVersion", "0"))
        except ValueError:
            version = 0
        if version >= 1:
            body: dict[str, Any] = {"negotiateVersion": 1, "connectionId": connection_id,
                                    "connectionToken": connection_token, "availableTransports": transports}
        else:
            # Version 0 clients connect with the connection id itself.
            self._pending[connection_id] = self._pending.pop(connection_token)
            body = {"connectionId": connection_id, "availableTransports": transports}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        hub, claims = self._client_claims(request)
        pending = self._pending.pop(request.query.get("id", ""), None)
        if pending is None or pending.hub != hub or pending.expires < time.time():
            raise web.HTTPNotFound(text="No Connection with that ID")
        if pending.user_id != claims.get("nameid"):
            raise web.HTTPUnauthorized(text="token does not belong to this connection")
        ws = web.WebSocketResponse(autoping=True, max_msg_size=1 << 20)
        await ws.prepare(request)
        connection = _Connection(id=pending.connection_id, hub=hub, user_id=pending.user_id, ws=ws)
        if not await self._handshake(connection):
            await ws.close()
            return ws
        self._add_connection(connection)
        log.info("SignalR client connected", extra={"hub": hub, "connection_id": connection.id,
                                                    "user_id": connection.user_id})
        writer = asyncio.create_task(self._write(connection))
        pinger = asyncio.create_task(self._ping(connection))
        try:
            await self._read(connection)
        finally:
            self._remove_connection(connection)
            pinger.cancel()
            with contextlib.suppress(asyncio.QueueFull):
                connection.outbox.put_nowait(None)
            await asyncio.gather(writer, pinger, return_exceptions=True)
            if not ws.closed:
                await ws.close()
            log.info("SignalR client disconnected", extra={"hub": hub, "connection_id": connection.id})
        return ws

    async def _handshake(self, connection: _Connection) -> bool:
        try:
            msg = await connection.ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            return False
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return False
        text = msg.data if isinstance(msg.data, str) else msg.data.decode("utf-8", errors="replace")
        record, sep, _rest = text.partition(RS)
        try:
            request = orjson.loads(record) if sep else None
        except orjson.JSONDecodeError:
            request = None
        if not isinstance(request, dict):
            await connection.ws.send_str(_frame({"error": "Handshake request is not valid JSON."}))
            return False
        if request.get("protocol") != "json":
            await connection.ws.send_str(_frame(
                {"error": f"Requested protocol '{request.get('protocol')}' is not available."}))
            return False
        if request.get("version") != 1:
            await connection.ws.send_str(_frame(
                {"error": f"The server does not support version {request.get('version')} of the json protocol."}))
            return False
        await connection.ws.send_str("{}" + RS)
        return True

    async def _read(self, connection: _Connection) -> None:
        ws = connection.ws
        while not ws.closed:
            try:
                msg = await ws.receive(timeout=CLIENT_TIMEOUT_S)
            except TimeoutError:
                await self._close(connection, "Connection was closed because the client did not send a message "
                                              "within the timeout interval.", allow_reconnect=True)
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            text = msg.data if isinstance(msg.data, str) else msg.data.decode("utf-8", errors="replace")
            for record in text.split(RS):
                if not record.strip():
                    continue
                try:
                    doc = orjson.loads(record)
                except orjson.JSONDecodeError:
                    await self._close(connection, "Invalid message: not JSON.", allow_reconnect=False)
                    return
                kind = doc.get("type") if isinstance(doc, dict) else None
                if kind == CLOSE:
                    return
                if kind == INVOCATION and doc.get("invocationId"):
                    # Serverless hubs have no server methods (no upstream configured).
                    connection.outbox.put_nowait(_frame({
                        "type": COMPLETION, "invocationId": doc["invocationId"],
                        "error": f"Failed to invoke '{doc.get('target')}': serverless hubs have no server methods."}))

    async def _write(self, connection: _Connection) -> None:
        while True:
            frame = await connection.outbox.get()
            if frame is None or connection.ws.closed:
                return
            try:
                await connection.ws.send_str(frame)
            except (ConnectionError, RuntimeError):
                return

    async def _ping(self, connection: _Connection) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            with contextlib.suppress(asyncio.QueueFull):
                connection.outbox.put_nowait(_frame({"type": PING}))

    async def _close(self, connection: _Connection, error: str | None, *, allow_reconnect: bool) -> None:
        doc: dict[str, Any] = {"type": CLOSE}
        if error:
            doc["error"] = error
        if allow_reconnect:
            doc["allowReconnect"] = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            await connection.ws.send_str(_frame(doc))
        await connection.ws.close()

    async def _rest_claims(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            raise web.HTTPUnauthorized(text="missing bearer token")
        try:
            claims = verify_token(self._key, header[7:].strip())
        except PermissionError as exc:
            raise web.HTTPUnauthorized(text=str(exc)) from exc
        # The audience is the URL called; hosts differ (localhost vs 127.0.0.1), paths must not.
        if urlparse(str(claims.get("aud", ""))).path.rstrip("/") != request.path.rstrip("/"):
            raise web.HTTPUnauthorized(text="token audience does not match the URL")

    async def _rest(self, request: web.Request) -> web.Response:
        await self._rest_claims(request)
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise SignalRError("body must be a JSON object")
            body = {k.lower(): v for k, v in body.items()}
            target = body.get("target")
            arguments = body.get("arguments") or []
            if not isinstance(target, str) or not target or not isinstance(arguments, list):
                raise SignalRError("body needs a string target and an arguments array")
        except (orjson.JSONDecodeError, SignalRError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        kind, ident = request.match_info.get("kind"), request.match_info.get("id")
        message = SignalRMessage(target=target, arguments=arguments,
                                 user_id=ident if kind == "users" else None,
                                 group_name=ident if kind == "groups" else None,
                                 connection_id=ident if kind == "connections" else None)
        await self.send(request.match_info["hub"], message)
        return web.Response(status=202)

    async def _rest_group(self, request: web.Request) -> web.Response:
        await self._rest_claims(request)
        group, kind, ident = request.match_info.get("group"), request.match_info.get("kind"), request.match_info["id"]
        if group is None:
            action = GroupAction(action="removeall", user_id=ident)
        else:
            action = GroupAction(action="add" if request.method == "PUT" else "remove", group_name=group,
                                 user_id=ident if kind == "users" else None,
                                 connection_id=ident if kind == "connections" else None)
        await self.send(request.match_info["hub"], action)
        return web.Response(status=202 if request.method == "PUT" else 200)

    async def close(self) -> None:
        """Tell every client the server is going away (they may reconnect), then close."""
        self._closing = True
        for connection in list(self._connections.values()):
            with contextlib.suppress(asyncio.QueueFull):
                connection.outbox.put_nowait(_frame({"type": CLOSE, "error": "Server is shutting down.",
                                                     "allowReconnect": True}))
                connection.outbox.put_nowait(None)
        for connection in list(self._connections.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.ws.close(), timeout=2)
        if self._forwarding is not None:
            self._forwarding.close()
        _unregister(self)


def _allow_origin(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"


def _same_service(a: str, b: str) -> bool:
    """True when two base URLs name the same listener (localhost and 127.0.0.1 are one)."""
    def key(url: str) -> tuple[str, int, str]:
        parsed = urlparse(url)
        host = (parsed.hostname or "").lower()
        host = "127.0.0.1" if host in ("localhost", "::1", "[::1]") else host
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return host, port, parsed.path.rstrip("/")
    return key(a) == key(b)


# -- the in-process API -----------------------------------------------------------------------------

_registry_lock = threading.Lock()
_services: list[SignalRService] = []


def _register(service: SignalRService) -> None:
    with _registry_lock:
        _services.append(service)


def _unregister(service: SignalRService) -> None:
    with _registry_lock:
        if service in _services:
            _services.remove(service)


def current() -> SignalRService:
    """The SignalR service of the devhost running in this process (the latest started)."""
    with _registry_lock:
        if not _services:
            raise RuntimeError("no devhost is running in this process")
        return _services[-1]


def publish(hub: str, target: str, arguments: list[Any], *, user_id: str | None = None,
            group_name: str | None = None, connection_id: str | None = None) -> None:
    """Send an invocation to a hub's clients from any code in the devhost process.

    ``publish("mailsync", "syncProgress", [progress], user_id=account_id)``
    """
    current().publish(hub, target, arguments, user_id=user_id, group_name=group_name, connection_id=connection_id)
