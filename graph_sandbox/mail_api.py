"""Graph's mail API under ``/v1.0``: users, mailFolders, messages, delta, sendMail.

One aiohttp handler takes every ``/v1.0/...`` request and walks the same
steps Graph does, in this order::

    authenticate (identity platform: 401 InvalidAuthenticationToken)
    -> resolve the mailbox: /me (delegated only) or /users/{id|address}
    -> route (paths are case-insensitive; mailFolders('id') key syntax works)
    -> permission (Mail.Read / Mail.ReadWrite / Mail.Send / User.Read*: 403)
    -> throttle per app + mailbox (429 MailboxConcurrency / rate, Retry-After)
    -> fault plan (503/504, 429 storms, 410 on delta, slow, truncated)
    -> latency (asyncio.sleep, counted inside the concurrency slot; a $batch
       item: execution_ms instead, the envelope paid the latency)
    -> the operation, answered with Graph's JSON (graph_sandbox.payloads)

Preferences honoured: ``IdType="ImmutableId"`` (message ids that survive
moves), ``odata.maxpagesize`` (delta pages), ``outlook.body-content-type``.
Each answer echoes what it applied in ``Preference-Applied``.

Delta rounds are described in graph_sandbox/delta.py.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from graph_sandbox import payloads
from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.attachments import Attachment, attachment_json, attachment_of, attachment_select, attachments_of
from graph_sandbox.delta import DELTA, SKIP, BadToken, DeltaToken, Tombstone, decode_token, encode_token
from graph_sandbox.faults import RequestFault
from graph_sandbox.mailbox import (
    Folder,
    Mailbox,
    MailboxError,
    Message,
    SearchSpec,
    newest_first_key,
)
from graph_sandbox.message_bodies import message_changes, new_message_fields, require_recipients
from graph_sandbox.query_options import instant_ms, int_option, parse_delta_filter, parse_filter, parse_orderby
from graph_sandbox.sync_states import SYNC_STATE_INVALID, SYNC_STATE_NOT_FOUND, StateKey

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxState, SandboxUser

log = logging.getLogger("graph_sandbox")

JSON_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"


def _corrupt_state() -> ApiError:
    return ApiError(400, "ErrorInvalidSyncStateData", "The sync state data is corrupt or otherwise invalid.")


# -- permissions ---------------------------------------------------------

_READ = frozenset({"mail.readbasic", "mail.read", "mail.readwrite", "mail.readbasic.all"})
_WRITE = frozenset({"mail.readwrite"})
_SEND = frozenset({"mail.send"})
_USER = frozenset({"user.read", "user.readwrite", "user.readbasic.all", "user.read.all", "user.readwrite.all",
                   "directory.read.all", "directory.readwrite.all"})
PERMISSIONS = {"read": _READ, "write": _WRITE, "send": _SEND, "user": _USER}


def _normalise_scope(scope: str) -> str:
    scope = scope.strip().lower()
    for prefix in ("https://graph.microsoft.com/", "https://graph.microsoft.com//"):
        if scope.startswith(prefix):
            return scope[len(prefix):]
    return scope


# -- request context -----------------------------------------------------------


@dataclass
class Ctx:
    """What a route handler needs about the request it serves."""

    request: web.Request
    state: SandboxState
    user: SandboxUser
    box: Mailbox
    scope_path: str                 # "me" or "users/{id}" as the client wrote it
    query: MultiMapping[str]
    immutable: bool
    text_body: bool
    max_page_size: int | None
    base: str                       # scheme://host (or config.public_url)
    body: Any = None
    applied: list[str] = field(default_factory=list)   # Preference-Applied values
    fault: RequestFault | None = None
    app_id: str = ""                # the calling app (sync states are kept per app, mailbox and folder)

    def link(self, path: str, params: dict[str, str]) -> str:
        query = urlencode(params, quote_via=quote, safe="$'(),")
        return f"{self.base}/v1.0/{self.scope_path}/{path}" + (f"?{query}" if query else "")

    def context(self, fragment: str) -> str:
        return f"{self.base}/v1.0/$metadata#{fragment}"


@dataclass
class Reply:
    status: int
    body: Any = None                # JSON-able, or None for no content
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None        # a binary answer instead of JSON (attachment $value)


Handler = Callable[..., Reply]


_KEY_SEGMENT = re.compile(r"^([^(]+)\((?:'(.*)'|(.*))\)$")


def split_path(path: str) -> list[str]:
    """Path segments with OData key syntax flattened: ``mailFolders('x')`` -> ``mailFolders``, ``x``."""
    out: list[str] = []
    for segment in path.split("/"):
        if not segment:
            continue
        match = _KEY_SEGMENT.match(segment)
        if match:
            name, key = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
            out.append(name)
            if key:                # delta() -> delta
                out.append(key.replace("''", "'"))
        else:
            out.append(segment)
    return out


# -- preferences ----------------------------------------------------------------

_PREF = re.compile(r'\s*([A-Za-z0-9_.\-]+)\s*(?:=\s*("?)([^",;]*)\2)?\s*')


def parse_prefer(headers: MultiMapping[str]) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for header in headers.getall("Prefer", []):
        for part in header.split(","):
            match = _PREF.fullmatch(part)
            if match and match.group(1):
                prefs[match.group(1).lower()] = match.group(3) or ""
    return prefs


# -- the API --------------------------------------------------------------------------


class MailApi:
    """All ``/v1.0`` mail routes (see the module docstring)."""

    def __init__(self, state: SandboxState, identity: Any) -> None:
        self.state = state
        self.identity = identity
        self._routes = self._route_table()

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/v1.0/{tail:.*}", self.handle)]

    # -- dispatch --------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        state.counters.requests += 1
        request_id = str(uuid.uuid4())
        client_request_id = request.headers.get("client-request-id", request_id)
        ids = {"request-id": request_id, "client-request-id": client_request_id}
        try:
            if request.match_info["tail"].strip("/").lower() == "$batch":
                return await self._batch(request, ids)
            return await self._handle(request, ids)
        except web.HTTPException as exc:          # the identity platform's 401
            state.counters.record(exc.status)
            exc.headers.update(ids)
            raise
        except ApiError as exc:
            return self._error(exc, ids)
        except MailboxError as exc:
            return self._error(ApiError(exc.status, exc.code, exc.message), ids)
        except Exception:
            log.exception("mail API failed on %s %s", request.method, request.path)
            return self._error(ApiError(500, "generalException", "An unexpected error occurred."), ids)

    async def _handle(self, request: web.Request, ids: dict[str, str], *,
                      batch_body: tuple[Any] | None = None, tail: str | None = None) -> web.StreamResponse:
        """One request; a ``$batch`` item comes with its parsed body and its path (``tail``)."""
        state = self.state
        principal = self.identity.authenticate(request)
        segments = split_path(request.match_info["tail"] if tail is None else tail)
        if not segments:
            raise bad_request("Invalid request.")
        head = segments[0].lower()
        if head == "me":
            if not principal.delegated:
                raise bad_request("/me request is only valid with delegated authentication flow.")
            user = state.users.get(principal.user_id or "")
            if user is None:
                raise ApiError(404, "ErrorInvalidUser", "The requested user is invalid.")
            scope_path, rest = "me", segments[1:]
        elif head == "users" and len(segments) >= 2:
            user = state.user(segments[1])
            if user is None:
                raise ApiError(404, "ErrorInvalidUser", f"The requested user '{segments[1]}' is invalid.")
            if principal.delegated and user.id != principal.user_id:
                raise ApiError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
            scope_path, rest = f"users/{segments[1]}", segments[2:]
        else:
            raise bad_request(f"Resource not found for the segment '{segments[0]}'.")

        handler, params, permission = self._match(request.method, rest)
        granted = {_normalise_scope(s) for s in principal.scopes}
        if not granted & PERMISSIONS[permission]:
            if permission == "user":
                raise ApiError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
            raise ApiError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")

        box = state.mailbox(user.id)
        box.expire_search_folders(state.clock.time_ms(), int(state.config.search_folder_idle_days * 86_400_000))
        key = (principal.app_id, user.id)
        throttle = state.throttle            # the one we acquire from is the one we release to
        rejection = throttle.try_acquire(key)
        if rejection is not None:
            raise ApiError(429, rejection.code, rejection.message,
                           {"Retry-After": str(rejection.retry_after_s)})
        try:
            delta_with_token = (rest and rest[-1].lower() == "delta"
                                and ("$skiptoken" in request.query or "$deltatoken" in request.query))
            faults = state.faults
            fault = faults.request_fault(key, state.clock.monotonic(), delta_with_token=bool(delta_with_token))
            if fault is not None:
                state.counters.faults_injected += 1
                if fault.kind == "expire_delta":
                    state.counters.delta_expired += 1
                if fault.kind in ("error", "storm", "expire_delta"):
                    headers = {} if fault.retry_after_s is None else {"Retry-After": str(fault.retry_after_s)}
                    raise ApiError(fault.status, fault.code, fault.message, headers)
                if fault.kind == "slow":
                    await asyncio.sleep(fault.delay_ms / 1000)
            # A $batch item is not a round trip of its own: the envelope paid the network latency once, and
            # the item holds its slot for as long as Outlook executes it (see _batch).
            spent_ms = state.config.execution_ms if tail is not None else state.config.latency_ms
            if spent_ms:
                await asyncio.sleep(spent_ms / 1000)
            ctx = self._context(request, user, box, scope_path)
            ctx.fault = fault
            ctx.app_id = principal.app_id
            if batch_body is not None:
                ctx.body = batch_body[0]
            elif request.method in ("POST", "PATCH") and request.can_read_body:
                raw = await request.read()
                if raw.strip():
                    try:
                        ctx.body = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        raise bad_request("Unable to read JSON request payload. Please ensure Content-Type header "
                                          "is set and payload is of valid JSON format.") from None
            reply = handler(ctx, *params)
            return await self._send(request, reply, ids, ctx)
        finally:
            throttle.release(key)

    def _context(self, request: web.Request, user: SandboxUser, box: Mailbox, scope_path: str) -> Ctx:
        prefs = parse_prefer(request.headers)
        immutable = prefs.get("idtype", "").lower() == "immutableid"
        text_body = prefs.get("outlook.body-content-type", "").lower() == "text"
        page: int | None = None
        if "odata.maxpagesize" in prefs:
            try:
                page = int(prefs["odata.maxpagesize"])
            except ValueError:
                page = None
            if page is not None and page < 1:
                page = None
        base = (self.state.config.public_url or f"{request.scheme}://{request.host}").rstrip("/")
        ctx = Ctx(request=request, state=self.state, user=user, box=box, scope_path=scope_path, query=request.query,
                  immutable=immutable, text_body=text_body, max_page_size=page, base=base)
        if immutable:
            ctx.applied.append('IdType="ImmutableId"')
        if text_body:
            ctx.applied.append('outlook.body-content-type="text"')
        return ctx

    async def _send(self, request: web.Request, reply: Reply, ids: dict[str, str], ctx: Ctx) -> web.StreamResponse:
        self.state.counters.record(reply.status)
        headers = {**ids, **reply.headers}
        if ctx.applied:
            headers["Preference-Applied"] = ", ".join(ctx.applied)
        if reply.raw is not None:            # a stream ($value): the handler set its Content-Type
            return web.Response(status=reply.status, body=reply.raw, headers=headers)
        if reply.body is None:
            return web.Response(status=reply.status, headers=headers)
        body = orjson.dumps(reply.body)
        headers["Content-Type"] = JSON_TYPE
        headers["OData-Version"] = "4.0"
        fault = ctx.fault
        if fault is not None and fault.kind == "truncate" and len(body) > 2:
            cut = body[: len(body) // 2]
            if fault.cut == "length":
                # A complete HTTP message whose JSON is cut: the client sees bad JSON.
                return web.Response(status=reply.status, body=cut, headers=headers)
            # The connection drops mid-body: the client sees fewer bytes than promised.
            response = web.StreamResponse(status=reply.status, headers=headers)
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(cut)
            if request.transport is not None:
                request.transport.close()
            return response
        return web.Response(status=reply.status, body=body, headers=headers)

    def _error(self, exc: ApiError, ids: dict[str, str]) -> web.Response:
        self.state.counters.record(exc.status)
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        body = payloads.error(exc.code, exc.message, request_id=ids["request-id"],
                              client_request_id=ids["client-request-id"], date=date)
        return web.Response(status=exc.status, body=orjson.dumps(body),
                            headers={**ids, **exc.headers, "Content-Type": JSON_TYPE})

    # -- routing ---------------------------------------------------------------------------

    def _route_table(self) -> list[tuple[str, tuple[str, ...], Handler, str]]:
        F, M, A = "{f}", "{m}", "{a}"
        return [
            ("GET", (), self.get_user, "user"),
            ("GET", ("mailfolders",), self.list_top_folders, "read"),
            ("POST", ("mailfolders",), self.create_top_folder, "write"),
            ("GET", ("mailfolders", "delta"), self.folders_delta, "read"),
            ("GET", ("mailfolders", F), self.get_folder, "read"),
            ("PATCH", ("mailfolders", F), self.update_folder, "write"),
            ("DELETE", ("mailfolders", F), self.delete_folder, "write"),
            ("POST", ("mailfolders", F, "move"), self.move_folder, "write"),
            ("GET", ("mailfolders", F, "childfolders"), self.list_child_folders, "read"),
            ("POST", ("mailfolders", F, "childfolders"), self.create_child_folder, "write"),
            ("GET", ("mailfolders", F, "messages"), self.list_folder_messages, "read"),
            ("POST", ("mailfolders", F, "messages"), self.create_folder_message, "write"),
            ("GET", ("mailfolders", F, "messages", "delta"), self.messages_delta, "read"),
            ("GET", ("mailfolders", F, "messages", M), self.get_folder_message, "read"),
            ("PATCH", ("mailfolders", F, "messages", M), self.update_folder_message, "write"),
            ("DELETE", ("mailfolders", F, "messages", M), self.delete_folder_message, "write"),
            ("POST", ("mailfolders", F, "messages", M, "move"), self.move_folder_message, "write"),
            ("POST", ("mailfolders", F, "messages", M, "copy"), self.copy_folder_message, "write"),
            ("POST", ("mailfolders", F, "messages", M, "send"), self.send_folder_draft, "send"),
            ("GET", ("messages",), self.list_messages, "read"),
            ("POST", ("messages",), self.create_draft, "write"),
            ("GET", ("messages", M), self.get_message, "read"),
            ("PATCH", ("messages", M), self.update_message, "write"),
            ("DELETE", ("messages", M), self.delete_message, "write"),
            ("POST", ("messages", M, "move"), self.move_message, "write"),
            ("POST", ("messages", M, "copy"), self.copy_message, "write"),
            ("POST", ("messages", M, "send"), self.send_draft, "send"),
            ("POST", ("messages", M, "permanentdelete"), self.permanent_delete_message, "write"),
            ("GET", ("messages", M, "attachments"), self.list_attachments, "read"),
            ("GET", ("messages", M, "attachments", A), self.get_attachment, "read"),
            ("GET", ("messages", M, "attachments", A, "$value"), self.get_attachment_value, "read"),
            ("POST", ("sendmail",), self.send_mail, "send"),
        ]

    def _match(self, method: str, rest: list[str]) -> tuple[Handler, list[str], str]:
        rest = self._flatten_child_folders(rest)
        lowered = [s.lower() for s in rest]
        path_matched = False
        for route_method, pattern, handler, permission in self._routes:
            if len(pattern) != len(rest):
                continue
            params: list[str] = []
            for want, got, original in zip(pattern, lowered, rest, strict=True):
                if want.startswith("{"):
                    if got in ("delta", "move", "copy", "send", "messages", "childfolders", "attachments", "$value",
                               "permanentdelete"):
                        break
                    params.append(original)
                elif want != got:
                    break
            else:
                path_matched = True
                if route_method == method:
                    return handler, params, permission
        if path_matched:
            raise ApiError(405, "Request_BadRequest" if method != "PUT" else "BadRequest",
                           f"The HTTP method '{method}' is not supported for this resource.")
        last = rest[-1] if rest else ""
        raise bad_request(f"Resource not found for the segment '{last}'.")

    def _flatten_child_folders(self, rest: list[str]) -> list[str]:
        """mailFolders/{a}/childFolders/{b}/... -> mailFolders/{b}/... once b is a child of a."""
        while (len(rest) >= 4 and rest[0].lower() == "mailfolders" and rest[2].lower() == "childfolders"
               and rest[3].lower() not in ("delta",)):
            rest = ["mailfolders", f"\x00{rest[1]}\x00{rest[3]}", *rest[4:]]
        return rest

    def _folder(self, ctx: Ctx, ref: str) -> Folder:
        """A folder from a path parameter (id, well-known name, or parent-checked child)."""
        if ref.startswith("\x00"):
            _, parent_ref, child_ref = ref.split("\x00")
            parent = self._folder(ctx, parent_ref)
            child = ctx.box.folder(child_ref)
            if child.parent_id != parent.id:
                raise MailboxError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            return child
        # The root answers to its id as well as to "msgfolderroot" (the childFolders
        # nextLink of the root names it by id, as Graph's does).
        folder = ctx.box.folder(ref)
        if folder.search is not None:
            folder.last_used_ms = ctx.state.clock.time_ms()   # in use: it does not expire
        return folder

    # -- user --------------------------------------------------------------------

    def get_user(self, ctx: Ctx) -> Reply:
        body = {"@odata.context": ctx.context("users/$entity"), **payloads.user(ctx.user)}
        return Reply(200, body)

    # -- folders ---------------------------------------------------------------------

    def _folder_page(self, ctx: Ctx, folders: list[Folder], path: str, context: str) -> Reply:
        select = self._folder_select(ctx)
        top, skip = self._top_skip(ctx)
        page = folders[skip: skip + top]
        params = {k: v for k, v in ctx.query.items() if k not in ("$skip",)}
        next_link = None
        if skip + top < len(folders):
            next_link = ctx.link(path, {**params, "$skip": str(skip + top)})
        value = [payloads.mail_folder(f, ctx.box, select=select) for f in page]
        return Reply(200, payloads.collection(ctx.context(context), value, next_link=next_link))

    def list_top_folders(self, ctx: Ctx) -> Reply:
        hidden = ctx.query.get("includeHiddenFolders", "").lower() == "true"
        return self._folder_page(ctx, ctx.box.top_folders(include_hidden=hidden), "mailFolders",
                                 f"users('{ctx.user.id}')/mailFolders")

    def list_child_folders(self, ctx: Ctx, ref: str) -> Reply:
        folder = self._folder(ctx, ref)
        hidden = ctx.query.get("includeHiddenFolders", "").lower() == "true"
        return self._folder_page(ctx, ctx.box.child_folders(folder.id, include_hidden=hidden),
                                 f"mailFolders/{folder.id}/childFolders",
                                 f"users('{ctx.user.id}')/mailFolders('{folder.id}')/childFolders")

    def get_folder(self, ctx: Ctx, ref: str) -> Reply:
        folder = self._folder(ctx, ref)
        body = {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                **payloads.mail_folder(folder, ctx.box, select=self._folder_select(ctx))}
        return Reply(200, body)

    def create_top_folder(self, ctx: Ctx) -> Reply:
        return self._create_folder(ctx, ctx.box.root_id)

    def create_child_folder(self, ctx: Ctx, ref: str) -> Reply:
        return self._create_folder(ctx, self._folder(ctx, ref).id)

    def _create_folder(self, ctx: Ctx, parent_id: str) -> Reply:
        odata_type = ctx.body.get("@odata.type") if isinstance(ctx.body, dict) else None
        if isinstance(odata_type, str) and odata_type.lstrip("#").lower() == "microsoft.graph.mailsearchfolder":
            return self._create_search_folder(ctx, parent_id)
        body = self._json_object(ctx)
        self._only(body, {"displayName", "isHidden"}, "mailFolder")
        hidden = body.get("isHidden", False)
        if not isinstance(hidden, bool):
            raise bad_request("isHidden must be a boolean.")
        folder = ctx.box.create_folder(parent_id, body.get("displayName"), is_hidden=hidden)
        return Reply(201, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    def _create_search_folder(self, ctx: Ctx, parent_id: str) -> Reply:
        """POST childFolders with ``"@odata.type": "microsoft.graph.mailSearchFolder"`` (Graph's
        mailSearchFolder-post): displayName, sourceFolderIds, includeNestedFolders, filterQuery."""
        body = self._json_object(ctx)
        self._only(body, {"displayName", "sourceFolderIds", "includeNestedFolders", "filterQuery", "isHidden"},
                   "mailSearchFolder")
        sources = body.get("sourceFolderIds")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
            raise ApiError(400, "ErrorInvalidRequest", "sourceFolderIds must be a non-empty array of folder ids.")
        nested = body.get("includeNestedFolders", False)
        if not isinstance(nested, bool):
            raise bad_request("includeNestedFolders must be a boolean.")
        query = body.get("filterQuery", "")
        if query is None:
            query = ""
        if not isinstance(query, str):
            raise bad_request("filterQuery must be a string.")
        parse_filter(query)                     # refuses what Exchange would not take
        spec = SearchSpec(tuple(sources), nested, query)
        folder = ctx.box.create_search_folder(parent_id, body.get("displayName"), spec)
        return Reply(201, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    def update_folder(self, ctx: Ctx, ref: str) -> Reply:
        folder = self._folder(ctx, ref)
        body = self._json_object(ctx)
        self._only(body, {"displayName"}, "mailFolder")
        if "displayName" in body:
            ctx.box.rename_folder(folder.id, body["displayName"])
        return Reply(200, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    def delete_folder(self, ctx: Ctx, ref: str) -> Reply:
        ctx.box.delete_folder(self._folder(ctx, ref).id)
        return Reply(204)

    def move_folder(self, ctx: Ctx, ref: str) -> Reply:
        folder = self._folder(ctx, ref)
        destination = self._destination(ctx)
        ctx.box.move_folder(folder.id, destination)
        return Reply(201, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    def _folder_select(self, ctx: Ctx) -> tuple[str, ...] | None:
        raw = ctx.query.get("$select")
        if raw is None:
            return None
        try:
            return payloads.folder_select(raw.split(","))
        except KeyError as exc:
            raise ApiError(400, "RequestBroker--ParseUri", f"Could not find a property named '{exc.args[0]}' "
                           "on type 'microsoft.graph.mailFolder'.") from None

    # -- messages: read ---------------------------------------------------------------------

    def list_messages(self, ctx: Ctx) -> Reply:
        return self._message_page(ctx, None, "messages", f"users('{ctx.user.id}')/messages")

    def list_folder_messages(self, ctx: Ctx, ref: str) -> Reply:
        folder = self._folder(ctx, ref)
        return self._message_page(ctx, folder.id, f"mailFolders/{folder.id}/messages",
                                  f"users('{ctx.user.id}')/mailFolders('{folder.id}')/messages")

    def _message_page(self, ctx: Ctx, folder_id: str | None, path: str, context: str) -> Reply:
        select = self._message_select(ctx)
        top, skip = self._top_skip(ctx)
        predicate = parse_filter(ctx.query.get("$filter"))
        ordered = ctx.box.messages_newest_first(folder_id)
        orderby = ctx.query.get("$orderby")
        if orderby is not None:
            order = parse_orderby(orderby)
            if order == "asc":
                ordered = ordered[::-1]
        page: list[Message] = []
        seen = 0
        more = False
        for message in ordered:
            if predicate is not None and not predicate(message):
                continue
            if seen < skip:
                seen += 1
                continue
            if len(page) == top:
                more = True
                break
            page.append(message)
        value = [payloads.message(m, ctx.box, immutable=ctx.immutable, select=select, text_body=ctx.text_body)
                 for m in page]
        next_link = None
        if more:
            params = {k: v for k, v in ctx.query.items() if k != "$skip"}
            next_link = ctx.link(path, {**params, "$skip": str(skip + top)})
        return Reply(200, payloads.collection(ctx.context(context), value, next_link=next_link))

    def get_message(self, ctx: Ctx, mid: str) -> Reply:
        return self._message_reply(ctx, ctx.box.message(mid), 200, select=self._message_select(ctx))

    def get_folder_message(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.get_message(ctx, self._in_folder(ctx, ref, mid).rest_id)

    def _in_folder(self, ctx: Ctx, ref: str, mid: str) -> Message:
        folder = self._folder(ctx, ref)
        message = ctx.box.message(mid)
        if message.folder_id != folder.id:
            raise MailboxError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return message

    def _message_reply(self, ctx: Ctx, message: Message, status: int,
                       select: tuple[str, ...] | None = None) -> Reply:
        body = {"@odata.context": ctx.context(f"users('{ctx.user.id}')/messages/$entity"),
                **payloads.message(message, ctx.box, immutable=ctx.immutable, select=select,
                                   text_body=ctx.text_body)}
        return Reply(status, body)

    def _message_select(self, ctx: Ctx) -> tuple[str, ...] | None:
        raw = ctx.query.get("$select")
        if raw is None:
            return None
        try:
            return payloads.message_select(raw.split(","))
        except KeyError as exc:
            raise ApiError(400, "RequestBroker--ParseUri", f"Could not find a property named '{exc.args[0]}' "
                           "on type 'microsoft.graph.message'.") from None

    # -- messages: write ---------------------------------------------------------------------

    def update_message(self, ctx: Ctx, mid: str) -> Reply:
        message = ctx.box.message(mid)
        changes = message_changes(self._json_object(ctx), message, ctx.state.clock.time_ms())
        ctx.box.update_message(message, changes)
        return self._message_reply(ctx, message, 200)

    def update_folder_message(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.update_message(ctx, self._in_folder(ctx, ref, mid).rest_id)

    def delete_message(self, ctx: Ctx, mid: str) -> Reply:
        ctx.box.delete_message(ctx.box.message(mid))
        return Reply(204)

    def permanent_delete_message(self, ctx: Ctx, mid: str) -> Reply:
        """``POST messages/{id}/permanentDelete``: gone for good, from any folder."""
        ctx.box.delete_message(ctx.box.message(mid), permanently=True)
        return Reply(204)

    def delete_folder_message(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.delete_message(ctx, self._in_folder(ctx, ref, mid).rest_id)

    def move_message(self, ctx: Ctx, mid: str) -> Reply:
        message = ctx.box.message(mid)
        ctx.box.move_message(message, self._destination(ctx))
        return self._message_reply(ctx, message, 201)

    def move_folder_message(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.move_message(ctx, self._in_folder(ctx, ref, mid).rest_id)

    def copy_message(self, ctx: Ctx, mid: str) -> Reply:
        copy = ctx.box.copy_message(ctx.box.message(mid), self._destination(ctx))
        return self._message_reply(ctx, copy, 201)

    def copy_folder_message(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.copy_message(ctx, self._in_folder(ctx, ref, mid).rest_id)

    def _destination(self, ctx: Ctx) -> str:
        body = self._json_object(ctx)
        destination = body.get("destinationId")
        if not isinstance(destination, str) or not destination:
            raise ApiError(400, "ErrorInvalidRequest", "The destinationId property is required.")
        folder = ctx.box.folder(destination)
        return folder.id

    def create_draft(self, ctx: Ctx) -> Reply:
        return self._create_message(ctx, ctx.box.well_known["drafts"])

    def create_folder_message(self, ctx: Ctx, ref: str) -> Reply:
        return self._create_message(ctx, self._folder(ctx, ref).id)

    def _create_message(self, ctx: Ctx, folder_id: str) -> Reply:
        fields = new_message_fields(self._json_object(ctx), ctx.box)
        now = ctx.state.clock.time_ms()
        message = ctx.box.add_message(folder_id, **fields, received_ms=now, sent_ms=now, created_ms=now,
                                      modified_ms=now)
        return self._message_reply(ctx, message, 201)

    def send_mail(self, ctx: Ctx) -> Reply:
        body = self._json_object(ctx)
        self._only(body, {"message", "saveToSentItems"}, "sendMail")
        if not isinstance(body.get("message"), dict):
            raise ApiError(400, "ErrorInvalidRequest", "The message parameter is required.")
        save = body.get("saveToSentItems", True)
        if isinstance(save, str) and save.lower() in ("true", "false"):
            save = save.lower() == "true"
        if not isinstance(save, bool):
            raise bad_request("saveToSentItems must be a boolean.")
        fields = new_message_fields(body["message"], ctx.box)
        require_recipients(fields)
        ctx.state.mailboxes.send_mail(ctx.box, fields, save_to_sent=save)
        return Reply(202)

    def send_draft(self, ctx: Ctx, mid: str) -> Reply:
        draft = ctx.box.message(mid)
        if not draft.is_draft:
            raise ApiError(400, "ErrorInvalidRequest", "Only draft messages can be sent.")
        fields = {name: getattr(draft, name) for name in ("subject", "to", "cc", "bcc", "reply_to", "importance",
                                                          "categories", "flag", "body_type", "has_attachments")}
        fields["body_content"] = ctx.box.body_of(draft)[0]
        require_recipients(fields)
        ctx.state.mailboxes.send_mail(ctx.box, fields, save_to_sent=True, draft=draft)
        return Reply(202)

    def send_folder_draft(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.send_draft(ctx, self._in_folder(ctx, ref, mid).rest_id)

    # -- attachments ---------------------------------------------------------------------------

    def list_attachments(self, ctx: Ctx, mid: str) -> Reply:
        message = ctx.box.message(mid)
        select = self._attachment_select(ctx)
        value = [attachment_json(a, select=select) for a in attachments_of(message)]
        return Reply(200, payloads.collection(ctx.context(f"users('{ctx.user.id}')/messages('{mid}')/attachments"),
                                              value))

    def get_attachment(self, ctx: Ctx, mid: str, aid: str) -> Reply:
        attachment = self._attachment(ctx, mid, aid)
        body = {"@odata.context": ctx.context(f"users('{ctx.user.id}')/messages('{mid}')/attachments/$entity"),
                **attachment_json(attachment, select=self._attachment_select(ctx))}
        return Reply(200, body)

    def get_attachment_value(self, ctx: Ctx, mid: str, aid: str) -> Reply:
        """The raw bytes (``fileAttachment`` has a stream), with its content type."""
        attachment = self._attachment(ctx, mid, aid)
        return Reply(200, raw=attachment.content, headers={"Content-Type": attachment.content_type})

    def _attachment(self, ctx: Ctx, mid: str, aid: str) -> Attachment:
        attachment = attachment_of(ctx.box.message(mid), aid)
        if attachment is None:
            raise MailboxError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return attachment

    @staticmethod
    def _attachment_select(ctx: Ctx) -> tuple[str, ...] | None:
        try:
            return attachment_select(ctx.query.get("$select"))
        except KeyError as exc:
            raise ApiError(400, "RequestBroker--ParseUri", f"Could not find a property named '{exc.args[0]}' "
                           "on type 'microsoft.graph.attachment'.") from None

    # -- $batch --------------------------------------------------------------------------------

    async def _batch(self, request: web.Request, ids: dict[str, str]) -> web.Response:
        """JSON batching: up to 20 requests in one POST, answered in one 200.

        As Graph does, each item is its own request for authentication,
        permissions and throttling (an item over the mailbox's concurrency
        gets its own 429 inside a 200 envelope), and up to four items are
        dispatched at once. Items with ``dependsOn`` run in order, and an
        item whose dependency failed is answered 424.

        What an item costs, in Microsoft's words: "Requests in a batch are
        evaluated individually against throttling limits" (json-batching,
        "Batch size limitations"), and for Outlook "Microsoft Graph sends
        the Outlook service up to four individual requests from the batch at
        a time [...] Since Microsoft Graph sends only up to four requests to
        run in parallel, the execution of that batch stays within Outlook's
        concurrency limits for the same mailbox"; with ``dependsOn``, "one
        request from the batch at a time [...] and have up to four such
        batch requests run concurrently" (throttling-limits, "Outlook
        service limits for JSON batching"). The items are dispatched inside
        Microsoft's network; the client's round trip is the one POST. So the
        envelope pays ``latency_ms`` once, and each item holds one of the
        mailbox's concurrency slots while it executes (``execution_ms``).
        Charging the latency to every item, four at a time, made a batch of
        20 cost five round trips: 500 actions in 25 batches took at least
        12.5 s at 100 ms where Graph allows ~0.7 s (four dependsOn batches
        at a time, seven rounds).
        """
        if request.method != "POST":
            raise ApiError(405, "BadRequest", f"The HTTP method '{request.method}' is not supported for this resource.")
        try:
            envelope = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise bad_request("Unable to read JSON request payload.") from None
        items = envelope.get("requests") if isinstance(envelope, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, "BadRequest", "Invalid batch payload format.")
        if len(items) > BATCH_MAX:
            raise ApiError(400, "BadRequest", f"Batch request cannot contain more than {BATCH_MAX} requests.")
        seen: set[str] = set()
        for item in items:
            if (not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]
                    or not isinstance(item.get("method"), str) or not isinstance(item.get("url"), str)):
                raise ApiError(400, "BadRequest", "Each batch request needs a string id, method and url.")
            if item["id"] in seen:
                raise ApiError(400, "BadRequest", f"Batch request ids must be unique: '{item['id']}'.")
            seen.add(item["id"])
        if self.state.config.latency_ms:
            await asyncio.sleep(self.state.config.latency_ms / 1000)      # the round trip, once
        slots = asyncio.Semaphore(BATCH_PARALLEL)
        statuses: dict[str, int] = {}

        async def run(item: dict[str, Any]) -> dict[str, Any]:
            async with slots:
                depends = item.get("dependsOn") or []
                if any(statuses.get(d, 424) >= 400 for d in depends):
                    answer = {"id": item["id"], "status": 424,
                              "body": payloads.error("FailedDependency", "A request this one depends on failed.",
                                                     request_id=ids["request-id"],
                                                     client_request_id=ids["client-request-id"],
                                                     date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))}
                else:
                    answer = await self._batch_item(request, item, ids)
                statuses[item["id"]] = answer["status"]
                return answer

        if any(item.get("dependsOn") for item in items):
            answers = [await run(item) for item in items]
        else:
            answers = list(await asyncio.gather(*(run(item) for item in items)))
        return web.Response(status=200, body=orjson.dumps({"responses": answers}),
                            headers={**ids, "Content-Type": JSON_TYPE, "OData-Version": "4.0"})

    async def _batch_item(self, request: web.Request, item: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
        method = item["method"].upper()
        url = item["url"].lstrip("/")
        item_headers = item.get("headers") or {}
        if not isinstance(item_headers, dict):
            item_headers = {}
        # Only the caller's token carries over; Prefer (ImmutableId...) must be on each item, as on Graph.
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        headers.update({str(k): str(v) for k, v in item_headers.items()})
        has_body = "body" in item
        response: web.StreamResponse
        item_ids = {"request-id": str(uuid.uuid4()), "client-request-id": ids["client-request-id"]}
        if has_body and not any(k.lower() == "content-type" for k in item_headers):
            response = self._error(ApiError(400, "BadRequest", "Content-Type header is required when a body is "
                                            "present."), item_ids)
        else:
            target = URL(f"/v1.0/{url}")
            path = target.path[len("/v1.0/"):]          # percent-decoded, as aiohttp gives a route's tail
            try:
                clone = BatchItemRequest(method=method, headers=CIMultiDict(headers), scheme=request.scheme,
                                         host=request.host, query=target.query)
                body = (item.get("body"),) if has_body else None
                response = await self._handle(clone, item_ids, batch_body=body, tail=path)  # type: ignore[arg-type]
            except web.HTTPException as exc:
                self.state.counters.record(exc.status)
                response = web.Response(status=exc.status, body=exc.text, headers={**item_ids, **exc.headers})
            except ApiError as exc:
                response = self._error(exc, item_ids)
            except MailboxError as exc:
                response = self._error(ApiError(exc.status, exc.code, exc.message), item_ids)
        return _batch_answer(item["id"], response)

    # -- delta -------------------------------------------------------------------------------

    def _page_size(self, ctx: Ctx) -> int:
        config = ctx.state.config
        size = min(ctx.max_page_size or config.default_page_size, config.max_delta_page_size)
        ctx.applied.append(f"odata.maxpagesize={size}")
        return size

    def _token(self, ctx: Ctx, folder_id: str) -> DeltaToken | None:
        """The state token of a delta call (None: a first call) after every validity check."""
        skip, delta = ctx.query.get("$skiptoken"), ctx.query.get("$deltatoken")
        if skip is None and delta is None:
            return None
        try:
            token = decode_token(skip if skip is not None else delta or "", ctx.state.token_key)
        except BadToken:
            raise _corrupt_state() from None
        if token.kind != (SKIP if skip is not None else DELTA) or token.user_id != ctx.user.id \
                or token.folder_id != folder_id:
            raise _corrupt_state()
        if token.epoch != self._epoch(ctx.box):
            raise self._gone(ctx, folder_id, 410, "resyncRequired",
                             "Resync required. Replace any local cached data with the results of a full sync.")
        now_ms = ctx.state.clock.time_ms()
        if now_ms - token.issued_ms > ctx.state.config.delta_token_ttl_s * 1000:
            raise self._gone(ctx, folder_id, 410, SYNC_STATE_NOT_FOUND,
                             "The sync state generation is not found; the state expired.")
        if token.immutable is not None and folder_id and token.immutable != ctx.immutable:
            # Corso meets this when a link made without Prefer: IdType="ImmutableId" is used with it.
            raise self._gone(ctx, folder_id, 400, SYNC_STATE_INVALID,
                             "The sync state is invalid: it was created with another IdType preference.")
        evicted = ctx.state.delta.cache.check(self._state_key(ctx, folder_id), token.generation)
        if evicted is not None:
            raise self._gone(ctx, folder_id, ctx.state.config.delta_expired_status, SYNC_STATE_NOT_FOUND,
                             evicted.message)
        return token

    def _gone(self, ctx: Ctx, folder_id: str, status: int, code: str, message: str) -> ApiError:
        """A sync state the client named is gone (counted for the benchmarks)."""
        ctx.state.counters.delta_expired += 1
        ctx.state.delta.gone(self._state_key(ctx, folder_id))
        log.info("delta sync state gone: %s %s %s", folder_id or "(folder list)", code, message)
        return ApiError(status, code, message)

    @staticmethod
    def _state_key(ctx: Ctx, folder_id: str) -> StateKey:
        return (ctx.app_id, ctx.user.id, folder_id)

    def _issue(self, ctx: Ctx, token: DeltaToken, *, immutable: bool | None) -> str:
        """Encode a token for a link, as the newest generation of its folder's sync state."""
        generation = ctx.state.delta.cache.issue(self._state_key(ctx, token.folder_id))
        return encode_token(replace(token, generation=generation, immutable=immutable), ctx.state.token_key)

    def _visible_seq(self, ctx: Ctx, box: Mailbox) -> int:
        """The round's bound: the newest change delta may show yet (``delta_lag_s``)."""
        lag_ms = int(ctx.state.config.delta_lag_s * 1000)
        return box.change_clock.visible(ctx.state.clock.time_ms(), lag_ms, box.seq)

    def _round_started(self, ctx: Ctx, folder_id: str) -> None:
        if ctx.state.delta.round_started(self._state_key(ctx, folder_id)):
            ctx.state.counters.delta_restarts += 1

    def _epoch(self, box: Mailbox) -> int:
        return self.state.epoch * 1_000_000 + box.sync_epoch

    def messages_delta(self, ctx: Ctx, ref: str) -> Reply:
        folder = self._folder(ctx, ref)
        box, state = ctx.box, ctx.state
        token = self._token(ctx, folder.id)
        now_ms = state.clock.time_ms()
        folder.index.prune_tombstones(now_ms - int(state.config.delta_token_ttl_s * 1000))
        if token is None:
            select = self._message_select(ctx)
            change_type = ctx.query.get("changeType")
            if change_type is not None and change_type not in ("created", "updated", "deleted"):
                raise bad_request(f"Invalid changeType '{change_type}'. Use created, updated or deleted.")
            received = parse_delta_filter(ctx.query.get("$filter"))
            order = ctx.query.get("$orderby")
            desc = order is not None and parse_orderby(order) == "desc"
            top = self._delta_top(ctx)
            token = DeltaToken(SKIP, ctx.user.id, folder.id, self._epoch(box), since=0,
                               upto=self._visible_seq(ctx, box), cursor=0, issued_ms=now_ms, select=select,
                               change_type=change_type, received_filter=received, newest_first=desc, top=top,
                               top_left=top)
            self._round_started(ctx, folder.id)
        elif token.kind == DELTA:
            token = DeltaToken(SKIP, token.user_id, token.folder_id, token.epoch, since=token.since,
                               upto=max(token.since, self._visible_seq(ctx, box)),
                               cursor=token.since, issued_ms=now_ms, select=token.select,
                               change_type=token.change_type, received_filter=token.received_filter,
                               top=token.top, top_left=token.top)
        if token.since and token.since < folder.index.pruned_through:
            raise self._gone(ctx, folder.id, 410, SYNC_STATE_NOT_FOUND,
                             "The sync state generation is not found; the state expired.")
        size = self._page_size(ctx)
        state.counters.delta_pages += 1
        entries: list[Any]
        next_cursor: Any
        if token.top_left is not None and token.top_left <= 0:
            # $top reached: Outlook ends the round here. What was not returned is
            # not in the deltaLink either (it comes back only if it changes again).
            entries, next_cursor = [], None
        elif token.newest_first and token.since == 0:
            entries, next_cursor = self._scan_newest_first(box, folder, token, _capped(size, token.top_left))
        else:
            entries, next_cursor = self._scan(folder, token, _capped(size, token.top_left))
        select = token.select
        value: list[Any] = []
        for entry in entries:
            if isinstance(entry, Tombstone):
                value.append(payloads.removed(entry.immutable_id if ctx.immutable else entry.key))
            else:
                value.append(payloads.message(entry, box, immutable=ctx.immutable, select=select,
                                              odata_type=True, text_body=ctx.text_body))
        path = f"mailFolders('{folder.id}')/messages/delta"
        context = ctx.context("Collection(message)")
        if next_cursor is None:
            done = DeltaToken(DELTA, token.user_id, token.folder_id, token.epoch, since=token.upto, upto=0, cursor=0,
                              issued_ms=now_ms, select=token.select, change_type=token.change_type,
                              received_filter=token.received_filter, top=token.top, top_left=token.top)
            link = ctx.link(path, {"$deltatoken": self._issue(ctx, done, immutable=ctx.immutable)})
            return Reply(200, payloads.collection(context, value, delta_link=link))
        following = DeltaToken(SKIP, token.user_id, token.folder_id, token.epoch, since=token.since, upto=token.upto,
                               cursor=next_cursor, issued_ms=now_ms, select=token.select,
                               change_type=token.change_type, received_filter=token.received_filter,
                               newest_first=token.newest_first, top=token.top,
                               top_left=None if token.top_left is None else token.top_left - len(entries))
        link = ctx.link(path, {"$skiptoken": self._issue(ctx, following, immutable=ctx.immutable)})
        return Reply(200, payloads.collection(context, value, next_link=link))

    @staticmethod
    def _keeper(token: DeltaToken) -> Callable[[Message | Tombstone], bool]:
        """Does a changed entry belong in this round (changeType, $filter)?"""
        since, change_type = token.since, token.change_type
        bound_ms = instant_ms(token.received_filter[1]) if token.received_filter else None
        strict = token.received_filter is not None and token.received_filter[0] == "gt"

        def keep(entry: Message | Tombstone) -> bool:
            if isinstance(entry, Tombstone):
                return since > 0 and change_type in (None, "deleted")
            if since > 0 and change_type is not None:
                created = entry.entered_seq > since
                if change_type == "deleted" or created != (change_type == "created"):
                    return False
            if bound_ms is None:
                return True
            return entry.received_ms > bound_ms or (not strict and entry.received_ms == bound_ms)
        return keep

    def _scan(self, folder: Folder, token: DeltaToken, size: int) -> tuple[list[Any], int | None]:
        """One page in change order. Returns (entries, next cursor or None at the round's end)."""
        keep = self._keeper(token)
        entries: list[Any] = []
        last = token.cursor
        for seq, entry in self.state.mailbox(token.user_id).folder_changes(folder, token.cursor, token.upto):
            if len(entries) == size:
                if len(entries) > 1 and (self.state.faults.replay_delta_page() or self.state.delta.replay()):
                    # Fault: step back so the next page repeats this page's second half.
                    return entries, entries[len(entries) // 2 - 1].seq
                return entries, last
            last = seq
            if keep(entry):
                entries.append(entry)
        return entries, None

    def _scan_newest_first(self, box: Mailbox, folder: Folder, token: DeltaToken,
                           size: int) -> tuple[list[Any], list[int] | None]:
        """Initial round with $orderby=receivedDateTime desc: newest mail first.

        The cursor is (receivedDateTime ms, serial) of the last message read,
        found again by bisecting the folder's newest-first order (cached until
        its membership changes). Members that changed after the round began
        (seq > U) are skipped here and come in the next round.
        """
        ordered = box.messages_newest_first(folder.id)
        start = 0
        if token.cursor:
            received, serial = token.cursor
            start = bisect.bisect_right(ordered, (-received, -serial), key=newest_first_key)
        keep = self._keeper(token)
        entries: list[Any] = []
        last: Message | None = None
        for message in ordered[start:]:
            if len(entries) == size:
                assert last is not None
                return entries, [last.received_ms, last.serial]
            last = message
            if message.seq <= token.upto and keep(message):
                entries.append(message)
        return entries, None

    def folders_delta(self, ctx: Ctx) -> Reply:
        box, state = ctx.box, ctx.state
        token = self._token(ctx, "")
        now_ms = state.clock.time_ms()
        box.folder_index.prune_tombstones(now_ms - int(state.config.delta_token_ttl_s * 1000))
        if token is None:
            token = DeltaToken(SKIP, ctx.user.id, "", self._epoch(box), since=0, upto=self._visible_seq(ctx, box),
                               cursor=0, issued_ms=now_ms, select=self._folder_select(ctx))
            self._round_started(ctx, "")
        elif token.kind == DELTA:
            token = DeltaToken(SKIP, token.user_id, "", token.epoch, since=token.since,
                               upto=max(token.since, self._visible_seq(ctx, box)),
                               cursor=token.since, issued_ms=now_ms, select=token.select)
        if token.since and token.since < box.folder_index.pruned_through:
            raise self._gone(ctx, "", 410, SYNC_STATE_NOT_FOUND,
                             "The sync state generation is not found; the state expired.")
        size = self._page_size(ctx)
        value: list[Any] = []
        next_cursor: int | None = None
        last = token.cursor
        for seq, entry in box.folder_index.scan(token.cursor, token.upto):
            if len(value) == size:
                next_cursor = last
                break
            last = seq
            if isinstance(entry, Tombstone):
                if token.since > 0:
                    value.append(payloads.removed(entry.key, odata_type=payloads.FOLDER_TYPE))
            else:
                value.append(payloads.mail_folder(entry, box, select=token.select, odata_type=True))
        context = ctx.context("Collection(mailFolder)")
        if next_cursor is None:
            done = DeltaToken(DELTA, token.user_id, "", token.epoch, since=token.upto, upto=0, cursor=0,
                              issued_ms=now_ms, select=token.select)
            return Reply(200, payloads.collection(context, value, delta_link=ctx.link(
                "mailFolders/delta", {"$deltatoken": self._issue(ctx, done, immutable=None)})))
        following = DeltaToken(SKIP, token.user_id, "", token.epoch, since=token.since, upto=token.upto,
                               cursor=next_cursor, issued_ms=now_ms, select=token.select)
        return Reply(200, payloads.collection(context, value, next_link=ctx.link(
            "mailFolders/delta", {"$skiptoken": self._issue(ctx, following, immutable=None)})))

    @staticmethod
    def _delta_top(ctx: Ctx) -> int | None:
        """``$top`` on a message delta: not a page size but the most items one round returns.

        Outlook pages by ``Prefer: odata.maxpagesize``; with ``$top=N`` it
        stops the round after N items (the nextLink after them answers an
        empty page and a deltaLink, microsoft-graph-docs-contrib#7946), so a
        client that pages with ``$top`` silently misses the rest of the folder.
        """
        if "$top" not in ctx.query:
            return None
        top = int_option(ctx.query, "$top", 0)
        if top < 1:
            raise bad_request("Invalid value for $top: it must be a positive integer.")
        return top

    # -- small helpers -----------------------------------------------------------------------

    def _top_skip(self, ctx: Ctx) -> tuple[int, int]:
        top = int_option(ctx.query, "$top", ctx.state.config.default_page_size)
        skip = int_option(ctx.query, "$skip", 0)
        if top < 1:
            raise bad_request("Invalid value for $top: it must be a positive integer.")
        if top > 1000:
            raise bad_request(f"The limit of '1000' for Top query has been exceeded. The value from the incoming "
                              f"request is '{top}'.")
        if skip < 0:
            raise bad_request("Invalid value for $skip: it must not be negative.")
        return top, skip

    def _json_object(self, ctx: Ctx) -> dict[str, Any]:
        if ctx.body is None:
            return {}
        if not isinstance(ctx.body, dict):
            raise bad_request("The request body must be a JSON object.")
        return {k: v for k, v in ctx.body.items() if not k.startswith("@odata.")}

    @staticmethod
    def _only(body: dict[str, Any], allowed: set[str], type_name: str) -> None:
        for key in body:
            if key not in allowed:
                raise ApiError(400, "RequestBodyRead",
                               f"The property '{key}' does not exist on type 'microsoft.graph.{type_name}'. "
                               "Make sure to only use property names that are defined by the type.")


# -- query options ----------------------------------------------------------------------------


@dataclass
class BatchItemRequest:
    """The parts of a request ``_handle`` reads, for one ``$batch`` item (its body comes parsed).

    aiohttp cannot clone a request whose body was read, and the batch's
    body had to be read to find the items.
    """

    method: str
    headers: CIMultiDict[str]
    scheme: str
    host: str
    query: MultiMapping[str]
    can_read_body: bool = False
    transport: None = None


BATCH_MAX = 20
BATCH_PARALLEL = 4     # Graph dispatches up to four items of a batch at once


def _batch_answer(item_id: str, response: web.StreamResponse) -> dict[str, Any]:
    """One ``responses`` entry: JSON bodies inline, other bodies base64 (as Graph encodes them)."""
    keep = {str(k): v for k, v in response.headers.items()
            if k.lower() in ("content-type", "retry-after", "location", "preference-applied")}
    answer: dict[str, Any] = {"id": item_id, "status": response.status, "headers": keep}
    body = response.body if isinstance(response, web.Response) else None
    raw = body if isinstance(body, bytes) else b""
    if raw:
        if "json" in keep.get("Content-Type", "").lower():
            answer["body"] = orjson.loads(raw)
        else:
            answer["body"] = base64.b64encode(raw).decode("ascii")
    return answer


def _capped(size: int, left: int | None) -> int:
    return size if left is None else max(1, min(size, left))
