"""What a ``/v1.0`` route handler gets and shares: the request context, permissions, paths, Prefer, $select.

``graph_sandbox.mail_api`` dispatches a request to a handler with a
:class:`Ctx`; the handlers there, in ``mail_delta`` and in ``mail_batch``
answer with a :class:`Reply`. The helpers below read the parts of a
request every kind of route reads the same way (a folder reference, a
``$select``, a JSON body, ``$top``/``$skip``), with Graph's error for each.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from aiohttp import web
from multidict import MultiMapping

from graph_sandbox import payloads
from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.faults import RequestFault
from graph_sandbox.mailbox import Folder, Mailbox, MailboxError
from graph_sandbox.query_options import int_option

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxState, SandboxUser

JSON_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"


# -- permissions ---------------------------------------------------------

_READ = frozenset({"mail.readbasic", "mail.read", "mail.readwrite", "mail.readbasic.all"})
_WRITE = frozenset({"mail.readwrite"})
_SEND = frozenset({"mail.send"})
_USER = frozenset({"user.read", "user.readwrite", "user.readbasic.all", "user.read.all", "user.readwrite.all",
                   "directory.read.all", "directory.readwrite.all"})
PERMISSIONS = {"read": _READ, "write": _WRITE, "send": _SEND, "user": _USER}


def normalise_scope(scope: str) -> str:
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


# -- the parts of a request handlers read ------------------------------------------


def resolve_folder(ctx: Ctx, ref: str) -> Folder:
    """A folder from a path parameter (id, well-known name, or parent-checked child)."""
    if ref.startswith("\x00"):
        _, parent_ref, child_ref = ref.split("\x00")
        parent = resolve_folder(ctx, parent_ref)
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


def folder_select(ctx: Ctx) -> tuple[str, ...] | None:
    """The request's ``$select`` of mailFolder properties (None: every default one)."""
    return _selected(ctx, payloads.folder_select, "mailFolder")


def message_select(ctx: Ctx) -> tuple[str, ...] | None:
    """The request's ``$select`` of message properties (None: every default one)."""
    return _selected(ctx, payloads.message_select, "message")


def _selected(ctx: Ctx, parse: Callable[[list[str]], tuple[str, ...]], type_name: str) -> tuple[str, ...] | None:
    raw = ctx.query.get("$select")
    if raw is None:
        return None
    try:
        return parse(raw.split(","))
    except KeyError as exc:
        raise ApiError(400, "RequestBroker--ParseUri", f"Could not find a property named '{exc.args[0]}' "
                       f"on type 'microsoft.graph.{type_name}'.") from None


def json_object(ctx: Ctx) -> dict[str, Any]:
    if ctx.body is None:
        return {}
    if not isinstance(ctx.body, dict):
        raise bad_request("The request body must be a JSON object.")
    return {k: v for k, v in ctx.body.items() if not k.startswith("@odata.")}


def only_properties(body: dict[str, Any], allowed: set[str], type_name: str) -> None:
    for key in body:
        if key not in allowed:
            raise ApiError(400, "RequestBodyRead",
                           f"The property '{key}' does not exist on type 'microsoft.graph.{type_name}'. "
                           "Make sure to only use property names that are defined by the type.")


def top_skip(ctx: Ctx) -> tuple[int, int]:
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
