"""The Outlook provider: ``MailProvider`` over Microsoft Graph (or the local sandbox).

Everything Graph-specific about syncing lives here, so the engine only ever
sees opaque cursors, ``MessageBatch``/``FolderBatch`` and ``Message``:

* Folder list: ``GET me/mailFolders/delta``. Graph's folder delta is flat:
  one stream over every folder of the mailbox, nested ones included (no
  ``childFolders`` walk needed). v1.0 has no "well-known name" property, so
  the first round asks ``me/mailFolders/{inbox,sentitems,...}`` once and
  keeps the id → role map inside the folder cursor.
* Messages: ``GET me/mailFolders/{id}/messages/delta`` with ``$select`` of
  exactly the fields the store keeps and ``Prefer: odata.maxpagesize`` (never
  ``$top``, which Graph's delta treats as "stop after N"). ``@odata.nextLink``
  means "more of this round", ``@odata.deltaLink`` means "round complete";
  items carrying ``@removed`` left the folder (deleted, or moved away: the
  target folder's delta shows them again) and become removals.
* First screen: ``GET me/mailFolders/{id}/messages?$orderby=receivedDateTime
  desc&$top=N``.
* Search folders (``mailSearchFolder``, told apart by their ``@odata.type``)
  are views over other folders: their messages live elsewhere, with the same
  ids. Synced as folders, a message's folder would flip between its real
  folder and the view, and the view's expiry (45 days unused) would delete
  mail still in the Inbox. The folder list therefore never reports them,
  not even as removals.

Cursors wrap the next/delta link (plus the role map for folders) in a
versioned, base64url JSON envelope. A cursor we cannot read, or one whose
link points anywhere but our Graph root, is answered with ``CursorExpired``:
the engine then restarts the folder, which is always safe. Following a
tampered link could send the account's token to another host, so links are
only followed to the origin we were configured with.

Ids: ``GraphClient`` sends ``Prefer: IdType="ImmutableId"`` on every call, so a
message keeps its id when it moves and the store's document id is stable.

Mapping Graph JSON to ``Message`` is the hot path of an initial sync (one
call per message): plain dict lookups, one ``fromisoformat`` per timestamp,
no per-item allocations beyond the record itself.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import orjson

from mailsync.errors import CursorExpired, MailsyncError, MalformedResponse, NotFound, ProviderAuthError
from mailsync.models import (
    Account,
    Address,
    FlagStatus,
    Folder,
    FolderBatch,
    Message,
    MessageBatch,
)
from mailsync.ports import TokenProvider
from mailsync.providers.graph_client import BATCH_MAX, GRAPH_URL, GraphClient, GraphSession
from mailsync.settings import Settings

# Fields the store keeps (see mailsync.models.Message); body only when enabled.
MESSAGE_FIELDS: tuple[str, ...] = (
    "id", "parentFolderId", "subject", "from", "toRecipients", "ccRecipients",
    "receivedDateTime", "sentDateTime", "lastModifiedDateTime", "isRead", "flag",
    "importance", "categories", "hasAttachments", "conversationId", "internetMessageId",
    "bodyPreview", "isDraft",
)
FOLDER_FIELDS: tuple[str, ...] = (
    "id", "displayName", "parentFolderId", "totalItemCount", "unreadItemCount", "childFolderCount",
)
# Graph's well-known folder names, which are also the roles we store.
WELL_KNOWN_FOLDERS: tuple[str, ...] = ("inbox", "sentitems", "drafts", "deleteditems", "junkemail", "archive")

CURSOR_PREFIX = "g1."
SEARCH_FOLDER_TYPE = "#microsoft.graph.mailSearchFolder"
_FLAG_STATUS = {status.value: status for status in FlagStatus}
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"[ \t\r\f\v]+")


# --- cursors ---------------------------------------------------------------

def encode_cursor(link: str, *, complete: bool, roles: Mapping[str, str] | None = None,
                  pending: tuple[str, ...] = ()) -> str:
    """Wrap a Graph next/delta link (and the folder roles) into an opaque cursor.

    ``pending``: well-known names whose folders are still to be looked up;
    the link then also records whether it was a deltaLink (the round's end).
    """
    body: dict[str, Any] = {"k": "d" if complete else "n", "u": link}
    if roles:
        body["r"] = dict(roles)
    if pending:
        body["p"] = list(pending)
        body["u"] = ("d|" if complete else "n|") + link
    return CURSOR_PREFIX + base64.urlsafe_b64encode(orjson.dumps(body)).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, dict[str, str]]:
    """The link and role map inside a cursor; ``CursorExpired`` when unreadable."""
    link, roles, _ = decode_cursor_full(cursor)
    return link, roles


def decode_kind(marked_link: str) -> bool:
    """Whether a link recorded beside pending role lookups was a deltaLink."""
    return marked_link.startswith("d|")


def _strip_kind(marked_link: str) -> str:
    return marked_link[2:] if marked_link[:2] in ("d|", "n|") else marked_link


def decode_cursor_full(cursor: str) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """The link, role map and pending role lookups inside a cursor; ``CursorExpired`` when unreadable."""
    if not cursor.startswith(CURSOR_PREFIX):
        raise CursorExpired("folder cursor is not a Graph cursor")
    payload = cursor[len(CURSOR_PREFIX):]
    try:
        body = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise CursorExpired("folder cursor cannot be decoded") from exc
    if not isinstance(body, dict) or not isinstance(body.get("u"), str):
        raise CursorExpired("folder cursor has no link")
    roles = body.get("r") or {}
    pending = body.get("p") or []
    if not isinstance(roles, dict) or not isinstance(pending, list):
        raise CursorExpired("folder cursor has a bad role map")
    if any(name not in WELL_KNOWN_FOLDERS for name in pending):
        raise CursorExpired("folder cursor names an unknown folder role")
    return body["u"], {str(k): str(v) for k, v in roles.items()}, tuple(pending)


# --- mapping ---------------------------------------------------------------

def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise MalformedResponse(f"Graph sent an unreadable timestamp {value!r:.40}") from exc


# Built without the frozen dataclasses' __init__ (one object.__setattr__ per
# field, ~10x slower): this runs once per message of an initial sync. Every
# field is given, so the records are identical to constructor-built ones
# (tests/providers/test_graph_provider.py checks that).
_new = object.__new__
_R = TypeVar("_R")


def _record(cls: type[_R], fields: dict[str, Any]) -> _R:
    record = _new(cls)
    record.__dict__.update(fields)
    return record


class _AddressCache:
    """Senders and recipients repeat across a mailbox: one ``Address`` per (address, name)."""

    def __init__(self, limit: int = 4096) -> None:
        self._cache: dict[tuple[str, str], Address] = {}
        self._limit = limit

    def get(self, value: Any) -> Address | None:
        if not value:
            return None
        email = value.get("emailAddress") or {}
        key = (email.get("address") or "", email.get("name") or "")
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            found = self._cache[key] = _record(Address, {"address": key[0], "name": key[1]})
        return found

    def many(self, values: Any) -> tuple[Address, ...]:
        if not values:
            return ()
        return tuple(self.get(value) or _EMPTY_ADDRESS for value in values)


_EMPTY_ADDRESS = Address(address="")
_ADDRESSES = _AddressCache()


def html_to_text(html: str) -> str:
    """A cheap tag strip for bodies Graph sent as HTML despite our text preference."""
    text = _TAG.sub(" ", html)
    for entity, char in (("&nbsp;", " "), ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#39;", "'"),
                         ("&amp;", "&")):
        text = text.replace(entity, char)
    return _SPACE.sub(" ", text).strip()


def message_version(modified: datetime, observed_ms: int) -> int:
    """The store version of a message: ``lastModifiedDateTime`` in epoch ms, tie-broken by when we read it.

    Graph's ``lastModifiedDateTime`` has whole seconds. Two changes in the
    same second (read, then moved) give two states with one version, and
    the store keeps whichever write comes *last* — which, across two
    folders' streams, may be the older state: the source folder's page,
    read just before the move, written just after the target folder's.
    So the unused milliseconds carry the time we read the state (clamped
    to the second): a state read later wins a tie. The version still only
    grows: the next second starts above any offset.

    The offset is at least 1, never 0: the second's floor itself is kept
    for a state learnt from a change notification (``notified_version``),
    which every delta reading of the same state must replace.
    """
    ms = int(modified.timestamp()) * 1000 + modified.microsecond // 1000
    if ms % 1000 == 0:
        ms += min(999, max(1, observed_ms - ms))
    return ms


def notified_version(modified: datetime) -> int:
    """The store version of a state read from a change notification's resource data, not from delta.

    The floor of its ``lastModifiedDateTime`` second: below every delta
    reading of the same state (``message_version`` adds an offset of at
    least 1), so delta always confirms it by overwriting it, and below
    every state of a later second, so it never overwrites one. Within its
    second it ties with another notified state of that second (the later
    write wins until delta's reading, ``mailsync.monitoring.notified_states``).
    A timestamp with milliseconds (not Graph's form) gets one below them:
    delta keeps those milliseconds as they are.
    """
    ms = int(modified.timestamp()) * 1000 + modified.microsecond // 1000
    return ms if ms % 1000 == 0 else ms - 1


def map_message(item: Mapping[str, Any], account_id: str, folder_id: str,
                body_max_chars: int | None = None, observed_ms: int = 0) -> Message:
    """One Graph ``message`` JSON object → ``Message`` (version: see ``message_version``).

    ``folder_id`` is the folder whose stream returned the item; it wins over
    ``parentFolderId`` so a folder's stream only ever writes its own folder
    (a message that moved on is the next round's removal, not an upsert here).
    """
    try:
        message_id = item["id"]
        modified = datetime.fromisoformat(item["lastModifiedDateTime"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedResponse("Graph message without id or lastModifiedDateTime") from exc
    flag = item.get("flag")
    flag_status = _FLAG_STATUS.get(flag.get("flagStatus"), FlagStatus.NOT_FLAGGED) if flag else FlagStatus.NOT_FLAGGED
    body_text: str | None = None
    if body_max_chars is not None:
        body = item.get("body")
        if body:
            content = body.get("content") or ""
            if body.get("contentType") == "html":
                content = html_to_text(content)
            body_text = content[:body_max_chars]
    addresses = _ADDRESSES
    return _record(Message, {
        "account_id": account_id,
        "message_id": message_id,
        "folder_id": folder_id,
        "version": message_version(modified, observed_ms),
        "subject": item.get("subject") or "",
        "sender": addresses.get(item.get("from")),
        "to": addresses.many(item.get("toRecipients")),
        "cc": addresses.many(item.get("ccRecipients")),
        "received_at": _time(item.get("receivedDateTime")),
        "sent_at": _time(item.get("sentDateTime")),
        "modified_at": modified,
        "is_read": bool(item.get("isRead")),
        "flag_status": flag_status,
        "importance": item.get("importance") or "normal",
        "categories": tuple(item.get("categories") or ()),
        "has_attachments": bool(item.get("hasAttachments")),
        "conversation_id": item.get("conversationId"),
        "internet_message_id": item.get("internetMessageId"),
        "body_preview": item.get("bodyPreview") or "",
        "body_text": body_text,
        "is_draft": bool(item.get("isDraft")),
    })


def map_folder(item: Mapping[str, Any], account_id: str, roles: Mapping[str, str]) -> Folder:
    """One Graph ``mailFolder`` JSON object → ``Folder``."""
    folder_id = item.get("id")
    if not isinstance(folder_id, str) or not folder_id:
        raise MalformedResponse("Graph mailFolder without id")
    return Folder(
        account_id=account_id,
        folder_id=folder_id,
        name=item.get("displayName") or "",
        parent_id=item.get("parentFolderId"),
        role=roles.get(folder_id),
        total_count=item.get("totalItemCount"),
        unread_count=item.get("unreadItemCount"),
        child_folder_count=item.get("childFolderCount"),
    )


def is_search_folder(item: Mapping[str, Any]) -> bool:
    """A ``mailSearchFolder`` (OData annotates the derived type in a mailFolder collection)."""
    odata_type = item.get("@odata.type")
    return isinstance(odata_type, str) and odata_type.lower() == SEARCH_FOLDER_TYPE.lower()


def _page_items(body: Any) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get("value"), list):
        raise MalformedResponse("Graph page has no value array")
    return body["value"]  # type: ignore[no-any-return]


def _page_link(body: Mapping[str, Any]) -> tuple[str, bool]:
    next_link = body.get("@odata.nextLink")
    if isinstance(next_link, str) and next_link:
        return next_link, False
    delta_link = body.get("@odata.deltaLink")
    if isinstance(delta_link, str) and delta_link:
        return delta_link, True
    raise MalformedResponse("Graph delta page has neither nextLink nor deltaLink")


def _split(last: Mapping[str, _R | None]) -> tuple[tuple[_R, ...], tuple[str, ...]]:
    upserts = tuple(value for value in last.values() if value is not None)
    removals = tuple(key for key, value in last.items() if value is None)
    return upserts, removals


# --- the provider ------------------------------------------------------------

class GraphProvider:
    """``MailProvider`` for one Outlook account, over one pooled ``GraphClient``."""

    # Outlook keeps only a folder's newest few delta links (mailsync.sync.pipeline).
    cursors_expire = True

    def __init__(self, client: GraphClient, account_id: str, *, page_size: int = 500,
                 store_body_text: bool = True, body_text_max_chars: int = 32_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._clock = clock
        self._account_id = account_id
        self._body_max = body_text_max_chars if store_body_text else None
        fields = MESSAGE_FIELDS + (("body",) if store_body_text else ())
        self._select = ",".join(fields)
        prefer = f"odata.maxpagesize={page_size}"
        if store_body_text:
            prefer += ', outlook.body-content-type="text"'
        self._headers = {"Prefer": prefer}
        self._list_headers = {"Prefer": 'outlook.body-content-type="text"'} if store_body_text else {}
        root = urlsplit(client.base_url)
        self._origin = (root.scheme, root.netloc)

    # folder list

    def folder_changes(self, cursor: str | None) -> FolderBatch:
        """The folder list's delta; the first round also learns the well-known folders' roles.

        Roles cost one request per well-known name. The Inbox's comes with
        the first page (the engine needs it for the first screen); the other
        roles come as a batch of their own right after the first page, so the
        first screen does not wait for five more round trips.
        """
        if cursor is None:
            roles = self._roles(WELL_KNOWN_FOLDERS[:1])[1]
            body = self._client.get("me/mailFolders/delta", params={"$select": ",".join(FOLDER_FIELDS[1:])},
                                    headers=self._headers)
            pending = WELL_KNOWN_FOLDERS[1:]
        else:
            link, roles, pending = decode_cursor_full(cursor)
            if pending:
                return self._pending_roles(link, roles, pending)
            body = self._client.get(self._checked(link), headers=self._headers)
        items = _page_items(body)
        link, complete = _page_link(body)
        last: dict[str, Folder | None] = {}
        for item in items:
            if is_search_folder(item):
                continue
            if "@removed" in item:
                if isinstance(item.get("id"), str):
                    last.pop(item["id"], None)
                    last[item["id"]] = None
                continue
            folder = map_folder(item, self._account_id, roles)
            last.pop(folder.folder_id, None)
            last[folder.folder_id] = folder
        upserts, removals = _split(last)
        if pending:
            return FolderBatch(upserts=upserts, removals=removals, complete=False,
                               cursor=encode_cursor(link, complete=complete, roles=roles, pending=pending))
        return FolderBatch(upserts=upserts, removals=removals,
                           cursor=encode_cursor(link, complete=complete, roles=roles), complete=complete)

    def _pending_roles(self, link: str, roles: dict[str, str], pending: tuple[str, ...]) -> FolderBatch:
        """The well-known folders still unnamed, as upserts with their roles; then the delta goes on."""
        found, learned = self._roles(pending)
        roles = {**roles, **learned}
        folders = tuple(map_folder(item, self._account_id, roles) for item in found)
        complete = decode_kind(link)
        return FolderBatch(upserts=folders, removals=(), complete=complete,
                           cursor=encode_cursor(_strip_kind(link), complete=complete, roles=roles))

    def _roles(self, names: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The well-known folders ``names`` (one JSON batch: a round trip, not one per name)."""
        found: list[dict[str, Any]] = []
        roles: dict[str, str] = {}
        params = {"$select": ",".join(FOLDER_FIELDS[1:])}
        answers = self._client.batch_get([(f"me/mailFolders/{name}", params, None) for name in names])
        for name, body in zip(names, answers, strict=True):
            if isinstance(body, NotFound):
                continue  # e.g. no archive folder in this mailbox
            if isinstance(body, MailsyncError):
                raise body
            if isinstance(body, dict) and isinstance(body.get("id"), str):
                roles[body["id"]] = name
                found.append(body)
        return found, roles

    # messages

    def message_changes(self, folder_id: str, cursor: str | None) -> MessageBatch:
        observed_ms = int(self._clock() * 1000)
        url, params = self._changes_request(folder_id, cursor)
        return self._changes_page(folder_id, self._client.get(url, params=params, headers=self._headers),
                                  observed_ms)

    def message_changes_many(self, reads: Sequence[tuple[str, str | None]]) -> list[MessageBatch | MailsyncError]:
        """Several folders' next pages in JSON batches of up to 20: one round trip per batch, not per folder.

        Graph evaluates each item of a batch on its own against throttling, and
        sends Outlook at most four of them at a time, within the mailbox's
        concurrency limit (json-batching, "Batch size limitations"; throttling
        limits, "Outlook service limits for JSON batching"): so a batch costs
        the mailbox what its items would, and our one request slot stands for
        Graph's four lanes. An item's delta page is the page its own request
        would get (its links absolute, followed later one by one or batched
        again). Per read its page, or the error that refused it.
        """
        found: list[MessageBatch | MailsyncError] = []
        for start in range(0, len(reads), BATCH_MAX):
            chunk = reads[start:start + BATCH_MAX]
            observed_ms = int(self._clock() * 1000)
            requests: list[tuple[str, Mapping[str, str] | None, Mapping[str, str] | None]] = []
            refused: dict[int, MailsyncError] = {}
            for n, (folder_id, cursor) in enumerate(chunk):
                try:
                    url, params = self._changes_request(folder_id, cursor)
                except MailsyncError as exc:      # an unreadable cursor, a link off our origin
                    refused[n] = exc
                    continue
                requests.append((url, params, self._headers))
            answers = iter(self._client.batch_get(requests))
            for n, (folder_id, _) in enumerate(chunk):
                answer = refused[n] if n in refused else next(answers)
                if isinstance(answer, ProviderAuthError):
                    raise answer       # the account's token, refused after a refresh: not this read's
                if isinstance(answer, MailsyncError):
                    found.append(answer)
                    continue
                try:
                    found.append(self._changes_page(folder_id, answer, observed_ms))
                except MailsyncError as exc:
                    found.append(exc)
        return found

    def _changes_request(self, folder_id: str, cursor: str | None) -> tuple[str, dict[str, str] | None]:
        """The URL and query of a folder's next delta page after ``cursor``."""
        if cursor is None:
            # Newest first on the initial round: the list fills from the top.
            return (f"me/mailFolders/{quote(folder_id, safe='')}/messages/delta",
                    {"$select": self._select, "$orderby": "receivedDateTime desc"})
        link, _ = decode_cursor(cursor)
        return self._checked(link), None

    def _changes_page(self, folder_id: str, body: Any, observed_ms: int) -> MessageBatch:
        items = _page_items(body)
        link, complete = _page_link(body)
        account_id = self._account_id
        body_max = self._body_max
        # One entry per id, the stream's last word on it: a message that left
        # and came back within a page (moved away and back) is an upsert, one
        # that changed and then left is a removal.
        last: dict[str, Message | None] = {}
        tags: dict[str, str] = {}
        for item in items:
            if "@removed" in item:
                if isinstance(item.get("id"), str):
                    last.pop(item["id"], None)
                    last[item["id"]] = None
                continue
            message = map_message(item, account_id, folder_id, body_max, observed_ms)
            if message.message_id in last:
                del last[message.message_id]
            last[message.message_id] = message
            tag = item.get("@odata.etag")
            if isinstance(tag, str):
                tags[message.message_id] = tag
            else:
                tags.pop(message.message_id, None)
        upserts, removals = _split(last)
        return MessageBatch(upserts=upserts, removals=removals,
                            cursor=encode_cursor(link, complete=complete), complete=complete,
                            versions={m.message_id: tags[m.message_id] for m in upserts if m.message_id in tags})

    def newest_messages(self, folder_id: str, limit: int) -> tuple[Message, ...]:
        """The first screen, at the lowest version of each message's second (no read time in it).

        This listing is not delta: it shows a change at once, while delta may
        show it seconds later. The Inbox's first round, starting inside that
        lag, does not list the message and removes it as unseen; the deletion
        leaves a tombstone one version above. The round that finally lists it
        reads the same state — with the read time in the version, often the
        very same version (both reads a second or more after the change) — and
        the tombstone refused it: the message stayed missing. At the second's
        floor, any later read of the same state (its read offset is at least
        1 ms) is at or above the tombstone, and the first screen is rewritten
        by the rounds anyway (versions: ``message_version``).
        """
        body = self._client.get(
            f"me/mailFolders/{quote(folder_id, safe='')}/messages",
            params={"$select": self._select, "$orderby": "receivedDateTime desc", "$top": str(limit)},
            headers=self._list_headers,
        )
        return tuple(map_message(item, self._account_id, folder_id, self._body_max)
                     for item in _page_items(body)[:limit])

    def close(self) -> None:
        self._client.close()

    def _checked(self, link: str) -> str:
        parts = urlsplit(link)
        if (parts.scheme, parts.netloc) != self._origin:
            # Real Graph links name graph.microsoft.com; in sandbox mode the
            # sandbox writes its own origin. Anything else is not ours.
            raise CursorExpired("folder cursor points outside the Graph root")
        return link


class GraphProviderFactory:
    """``ProviderFactory`` for Outlook accounts: one pooled session shared by all accounts."""

    def __init__(self, settings: Settings, token_provider: TokenProvider, *,
                 client_factory: Callable[[Callable[[bool], str], str], GraphClient] | None = None) -> None:
        self._settings = settings
        self._tokens = token_provider
        self._base_url = (settings.graph_sandbox_url + "/v1.0") if settings.graph_sandbox_url else GRAPH_URL
        self._session = self.new_session(32)
        self._client_factory = client_factory

    @property
    def base_url(self) -> str:
        return self._base_url

    def new_session(self, pool_size: int) -> GraphSession:
        """Another pooled session to Graph, configured as this factory's."""
        return GraphClient.new_session(pool_size=pool_size, settings=self._settings)

    def open(self, account: Account) -> GraphProvider:
        account_id = account.account_id

        def token(force_refresh: bool) -> str:
            return self._tokens.access_token(account_id, force_refresh=force_refresh)

        if self._client_factory is not None:
            client = self._client_factory(token, self._base_url)
        else:
            client = _SharedSessionClient(token, base_url=self._base_url, session=self._session)
        return GraphProvider(client, account_id, page_size=self._settings.graph_page_size,
                             store_body_text=self._settings.store_body_text,
                             body_text_max_chars=self._settings.body_text_max_chars)


class _SharedSessionClient(GraphClient):
    """A GraphClient whose pooled session belongs to the factory (closing it is a no-op)."""

    def close(self) -> None:
        return None
