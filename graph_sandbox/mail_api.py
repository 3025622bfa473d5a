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

Delta queries are in graph_sandbox/mail_delta.py (rounds: graph_sandbox/delta.py), $batch in
graph_sandbox/mail_batch.py, and what every handler reads of a request in
graph_sandbox/mail_request.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from graph_sandbox import payloads
from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.attachments import Attachment, attachment_json, attachment_of, attachment_select, attachments_of
from graph_sandbox.mail_batch import BatchRoutes
from graph_sandbox.mail_delta import DeltaRoutes
from graph_sandbox.mail_request import (
    JSON_TYPE,
    PERMISSIONS,
    Ctx,
    Handler,
    Reply,
    folder_select,
    json_object,
    message_select,
    normalise_scope,
    only_properties,
    parse_prefer,
    resolve_folder,
    split_path,
    top_skip,
)
from graph_sandbox.mailbox import (
    Folder,
    Mailbox,
    MailboxError,
    Message,
    SearchSpec,
)
from graph_sandbox.message_bodies import message_changes, new_message_fields, require_recipients
from graph_sandbox.query_options import parse_filter, parse_orderby

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxState, SandboxUser

log = logging.getLogger("graph_sandbox")

# -- the API --------------------------------------------------------------------------


class MailApi:
    """All ``/v1.0`` mail routes (see the module docstring)."""

    def __init__(self, state: SandboxState, identity: Any) -> None:
        self.state = state
        self.identity = identity
        self._delta = DeltaRoutes(state)
        self._batch = BatchRoutes(state, self._handle, self._error)
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
                return await self._batch.answer(request, ids)
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
        granted = {normalise_scope(s) for s in principal.scopes}
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
            ("GET", ("mailfolders", "delta"), self._delta.folders_delta, "read"),
            ("GET", ("mailfolders", F), self.get_folder, "read"),
            ("PATCH", ("mailfolders", F), self.update_folder, "write"),
            ("DELETE", ("mailfolders", F), self.delete_folder, "write"),
            ("POST", ("mailfolders", F, "move"), self.move_folder, "write"),
            ("GET", ("mailfolders", F, "childfolders"), self.list_child_folders, "read"),
            ("POST", ("mailfolders", F, "childfolders"), self.create_child_folder, "write"),
            ("GET", ("mailfolders", F, "messages"), self.list_folder_messages, "read"),
            ("POST", ("mailfolders", F, "messages"), self.create_folder_message, "write"),
            ("GET", ("mailfolders", F, "messages", "delta"), self._delta.messages_delta, "read"),
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

    # -- user --------------------------------------------------------------------

    def get_user(self, ctx: Ctx) -> Reply:
        body = {"@odata.context": ctx.context("users/$entity"), **payloads.user(ctx.user)}
        return Reply(200, body)

    # -- folders ---------------------------------------------------------------------

    def _folder_page(self, ctx: Ctx, folders: list[Folder], path: str, context: str) -> Reply:
        select = folder_select(ctx)
        top, skip = top_skip(ctx)
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
        folder = resolve_folder(ctx, ref)
        hidden = ctx.query.get("includeHiddenFolders", "").lower() == "true"
        return self._folder_page(ctx, ctx.box.child_folders(folder.id, include_hidden=hidden),
                                 f"mailFolders/{folder.id}/childFolders",
                                 f"users('{ctx.user.id}')/mailFolders('{folder.id}')/childFolders")

    def get_folder(self, ctx: Ctx, ref: str) -> Reply:
        folder = resolve_folder(ctx, ref)
        body = {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                **payloads.mail_folder(folder, ctx.box, select=folder_select(ctx))}
        return Reply(200, body)

    def create_top_folder(self, ctx: Ctx) -> Reply:
        return self._create_folder(ctx, ctx.box.root_id)

    def create_child_folder(self, ctx: Ctx, ref: str) -> Reply:
        return self._create_folder(ctx, resolve_folder(ctx, ref).id)

    def _create_folder(self, ctx: Ctx, parent_id: str) -> Reply:
        odata_type = ctx.body.get("@odata.type") if isinstance(ctx.body, dict) else None
        if isinstance(odata_type, str) and odata_type.lstrip("#").lower() == "microsoft.graph.mailsearchfolder":
            return self._create_search_folder(ctx, parent_id)
        body = json_object(ctx)
        only_properties(body, {"displayName", "isHidden"}, "mailFolder")
        hidden = body.get("isHidden", False)
        if not isinstance(hidden, bool):
            raise bad_request("isHidden must be a boolean.")
        folder = ctx.box.create_folder(parent_id, body.get("displayName"), is_hidden=hidden)
        return Reply(201, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    def _create_search_folder(self, ctx: Ctx, parent_id: str) -> Reply:
        """POST childFolders with ``"@odata.type": "microsoft.graph.mailSearchFolder"`` (Graph's
        mailSearchFolder-post): displayName, sourceFolderIds, includeNestedFolders, filterQuery."""
        body = json_object(ctx)
        only_properties(body, {"displayName", "sourceFolderIds", "includeNestedFolders", "filterQuery", "isHidden"},
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
        folder = resolve_folder(ctx, ref)
        body = json_object(ctx)
        only_properties(body, {"displayName"}, "mailFolder")
        if "displayName" in body:
            ctx.box.rename_folder(folder.id, body["displayName"])
        return Reply(200, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    def delete_folder(self, ctx: Ctx, ref: str) -> Reply:
        ctx.box.delete_folder(resolve_folder(ctx, ref).id)
        return Reply(204)

    def move_folder(self, ctx: Ctx, ref: str) -> Reply:
        folder = resolve_folder(ctx, ref)
        destination = self._destination(ctx)
        ctx.box.move_folder(folder.id, destination)
        return Reply(201, {"@odata.context": ctx.context(f"users('{ctx.user.id}')/mailFolders/$entity"),
                           **payloads.mail_folder(folder, ctx.box)})

    # -- messages: read ---------------------------------------------------------------------

    def list_messages(self, ctx: Ctx) -> Reply:
        return self._message_page(ctx, None, "messages", f"users('{ctx.user.id}')/messages")

    def list_folder_messages(self, ctx: Ctx, ref: str) -> Reply:
        folder = resolve_folder(ctx, ref)
        return self._message_page(ctx, folder.id, f"mailFolders/{folder.id}/messages",
                                  f"users('{ctx.user.id}')/mailFolders('{folder.id}')/messages")

    def _message_page(self, ctx: Ctx, folder_id: str | None, path: str, context: str) -> Reply:
        select = message_select(ctx)
        top, skip = top_skip(ctx)
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
        return self._message_reply(ctx, ctx.box.message(mid), 200, select=message_select(ctx))

    def get_folder_message(self, ctx: Ctx, ref: str, mid: str) -> Reply:
        return self.get_message(ctx, self._in_folder(ctx, ref, mid).rest_id)

    def _in_folder(self, ctx: Ctx, ref: str, mid: str) -> Message:
        folder = resolve_folder(ctx, ref)
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

    # -- messages: write ---------------------------------------------------------------------

    def update_message(self, ctx: Ctx, mid: str) -> Reply:
        message = ctx.box.message(mid)
        changes = message_changes(json_object(ctx), message, ctx.state.clock.time_ms())
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
        body = json_object(ctx)
        destination = body.get("destinationId")
        if not isinstance(destination, str) or not destination:
            raise ApiError(400, "ErrorInvalidRequest", "The destinationId property is required.")
        folder = ctx.box.folder(destination)
        return folder.id

    def create_draft(self, ctx: Ctx) -> Reply:
        return self._create_message(ctx, ctx.box.well_known["drafts"])

    def create_folder_message(self, ctx: Ctx, ref: str) -> Reply:
        return self._create_message(ctx, resolve_folder(ctx, ref).id)

    def _create_message(self, ctx: Ctx, folder_id: str) -> Reply:
        fields = new_message_fields(json_object(ctx), ctx.box)
        now = ctx.state.clock.time_ms()
        message = ctx.box.add_message(folder_id, **fields, received_ms=now, sent_ms=now, created_ms=now,
                                      modified_ms=now)
        return self._message_reply(ctx, message, 201)

    def send_mail(self, ctx: Ctx) -> Reply:
        body = json_object(ctx)
        only_properties(body, {"message", "saveToSentItems"}, "sendMail")
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
