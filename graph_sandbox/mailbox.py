"""The mailbox model: folders, messages, ids, and the change stream.

Ids behave like Exchange's:

- a message has an **immutable id** (``Prefer: IdType="ImmutableId"``) that
  never changes, and a **REST id** that is new every time the message enters
  a folder (move, delete to Deleted Items). An old REST id stops resolving
  (404), exactly the trap Outlook sets for sync engines;
- folder ids never change (moving a folder keeps its id).

Every change stamps the touched item with the mailbox's next ``seq``, is
recorded in the folder's :class:`~graph_sandbox.delta.ChangeIndex` (delta
query reads it) and is announced to listeners as :class:`MailChange` /
:class:`FolderChange` (change notifications read those). A move is
announced as ``deleted`` in the source (old REST id) then ``created`` in the
target (new REST id), like Graph's notifications.

All operations raise :class:`MailboxError` (with Graph's error code and
HTTP status) on bad input; nothing is changed when they do.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graph_sandbox.delta import ChangeIndex, Tombstone
from graph_sandbox.sync_states import ChangeClock

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxClock

log = logging.getLogger("graph_sandbox")

# Graph's well-known folder names -> display names, in Outlook's order.
WELL_KNOWN_FOLDERS: dict[str, str] = {
    "archive": "Archive",
    "conversationhistory": "Conversation History",
    "deleteditems": "Deleted Items",
    "drafts": "Drafts",
    "inbox": "Inbox",
    "junkemail": "Junk Email",
    "outbox": "Outbox",
    "sentitems": "Sent Items",
}
ROOT = "msgfolderroot"

IMPORTANCE = ("low", "normal", "high")
FLAG_STATUS = ("notFlagged", "flagged", "complete")
INFERENCE = ("focused", "other")


class MailboxError(Exception):
    """A refused mailbox operation, carrying Graph's status and error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found(what: str = "object") -> MailboxError:
    return MailboxError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


@dataclass(frozen=True, slots=True)
class MailChange:
    """A message change, for change notifications.

    ``message_id`` is the REST id valid at that moment in ``folder_id`` (for
    ``deleted``: the id it had in the folder it left); ``immutable_id`` is the
    id that survives moves.
    """

    user_id: str
    change_type: str        # created | updated | deleted
    message_id: str
    folder_id: str
    immutable_id: str = ""


@dataclass(frozen=True, slots=True)
class FolderChange:
    """A folder change (created, updated = renamed/moved, deleted)."""

    user_id: str
    change_type: str
    folder_id: str
    parent_folder_id: str


Listener = Callable[[Any], None]


def iso(ms: int) -> str:
    """Graph's DateTimeOffset form: UTC, whole seconds, ``Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def recipient(address: str, name: str = "") -> dict[str, Any]:
    """A Graph recipient object (shared, never mutated)."""
    return {"emailAddress": {"name": name or address, "address": address}}


@dataclass(slots=True, eq=False)
class Message:
    """One message. Recipients are Graph ``recipient`` dicts, treated as immutable."""

    immutable_id: str
    rest_id: str
    folder_id: str
    seq: int
    subject: str
    sender: dict[str, Any] | None
    from_: dict[str, Any] | None
    to: tuple[dict[str, Any], ...]
    cc: tuple[dict[str, Any], ...]
    bcc: tuple[dict[str, Any], ...]
    reply_to: tuple[dict[str, Any], ...]
    received_ms: int
    sent_ms: int
    created_ms: int
    modified_ms: int
    is_read: bool
    is_draft: bool
    importance: str
    flag: dict[str, Any]
    categories: tuple[str, ...]
    has_attachments: bool
    internet_message_id: str
    conversation_id: str
    conversation_index: str
    inference: str
    # The body is either given (drafts, sent mail) or generated on demand
    # from ``body_seed`` so that a 100k-message mailbox stays small.
    body_content: str | None = None
    body_type: str = "html"
    body_seed: int = 0
    preview: str | None = None
    version: int = 1
    entered_seq: int = 0           # seq when it entered its current folder
    moves: int = 0                 # how many REST ids it has had
    serial: int = 0
    _change_key: str = ""
    _change_key_version: int = 0

    @property
    def change_key(self) -> str:
        """Exchange's change key: new on every change (cached per version)."""
        if self._change_key_version != self.version:
            self._change_key = "CQAAABYAAA" + base64.b64encode(
                self.serial.to_bytes(5, "big") + self.version.to_bytes(4, "big")).decode("ascii")
            self._change_key_version = self.version
        return self._change_key


@dataclass(frozen=True)
class SearchSpec:
    """What a ``mailSearchFolder`` shows: messages of its source folders that match its filter.

    Plain data (the sandbox's state is pickled); ``matches`` is
    ``filter_query`` compiled by the mail API's parser (the only place that
    parses OData filters; callers validate the query with it first). An empty
    query matches every message.
    """

    source_ids: tuple[str, ...]
    include_nested: bool
    filter_query: str

    @property
    def matches(self) -> Callable[[Message], bool]:
        return _compiled_filter(self.filter_query)


@functools.lru_cache(maxsize=256)
def _compiled_filter(query: str) -> Callable[[Message], bool]:
    from graph_sandbox.query_options import parse_filter  # late: query_options imports this module

    return parse_filter(query) or _everything


def _everything(message: Message) -> bool:
    return True


@dataclass(slots=True, eq=False)
class Folder:
    """One mail folder with its messages' change index (a search folder has none of its own)."""

    id: str
    display_name: str
    parent_id: str
    well_known: str | None
    seq: int
    is_hidden: bool = False
    children: list[str] = field(default_factory=list)
    index: ChangeIndex[Message] = field(default_factory=ChangeIndex)
    unread: int = 0
    sorted_cache: tuple[int, list[Message]] | None = None   # (version, newest first)
    members_version: int = 0
    search: SearchSpec | None = None   # set: a mailSearchFolder (a view over other folders)
    last_used_ms: int = 0              # search folders expire when unused (Exchange: 45 days)

    @property
    def messages(self) -> dict[str, Message]:
        return self.index.live


class Mailbox:
    """One user's mailbox. See the module docstring for id and change rules."""

    def __init__(self, user_id: str, address: str, display_name: str, *, id_salt: str,
                 clock: SandboxClock, listeners: list[Listener]) -> None:
        self.user_id = user_id
        self.address = address
        self.display_name = display_name
        self.me = recipient(address, display_name)
        self._salt = id_salt.encode()
        self._clock = clock
        self._listeners = listeners          # shared with the registry
        self._own_listeners: list[Listener] = []
        self.seq = 0
        self.change_clock = ChangeClock()   # when each seq happened (delta's lag)
        self.sync_epoch = 1
        self._serial = 0
        self._folder_serial = 0
        self.folders: dict[str, Folder] = {}
        self.folder_index: ChangeIndex[Folder] = ChangeIndex()
        self.by_rest: dict[str, Message] = {}
        self.by_immutable: dict[str, Message] = {}
        self.well_known: dict[str, str] = {}
        self.members_version = 0           # grows when any folder gains/loses a message
        self._sorted_all: tuple[int, list[Message]] | None = None
        root = self._new_folder("Top of Information Store", parent_id="", well_known=ROOT, index_it=False)
        self.root_id = root.id

    # -- listeners -----------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(MailChange | FolderChange)`` after every change to this mailbox."""
        self._own_listeners.append(listener)

    def _emit(self, change: MailChange | FolderChange) -> None:
        for listener in (*self._listeners, *self._own_listeners):
            try:
                listener(change)
            except Exception:  # a listener's bug must not undo a mailbox change
                log.exception("mailbox listener failed")

    # -- ids -----------------------------------------------------------------

    def _hash(self, *parts: object, size: int = 30) -> str:
        digest = hashlib.blake2b(":".join(map(str, parts)).encode(), key=self._salt, digest_size=size).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii")

    def _immutable_id(self, serial: int) -> str:
        return "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A" + self._hash("imm", serial)[:40] + "AAA="

    def _rest_id(self, serial: int, moves: int) -> str:
        return "AAMkAG" + self._hash("rest", serial, moves, size=45) + "AAA="

    def _folder_id(self, serial: int) -> str:
        return "AAMkAG" + self._hash("folder", serial, size=24)[:30] + "AAEMAAA="

    def _next_seq(self) -> int:
        self.seq += 1
        self.change_clock.record(self.seq, self._clock.time_ms())
        return self.seq

    # -- folders ---------------------------------------------------------------

    def _new_folder(self, name: str, *, parent_id: str, well_known: str | None, index_it: bool = True,
                    is_hidden: bool = False) -> Folder:
        self._folder_serial += 1
        folder = Folder(id=self._folder_id(self._folder_serial), display_name=name, parent_id=parent_id,
                        well_known=well_known, seq=self._next_seq(), is_hidden=is_hidden)
        self.folders[folder.id] = folder
        if well_known:
            self.well_known[well_known] = folder.id
        if parent_id:
            self.folders[parent_id].children.append(folder.id)
        if index_it:
            self.folder_index.put(folder.id, folder)
        return folder

    def folder(self, id_or_name: str) -> Folder:
        """A folder by id or well-known name (case-insensitive), else 404."""
        found = self.folders.get(id_or_name)
        if found is None:
            wk = self.well_known.get(id_or_name.lower())
            found = self.folders.get(wk) if wk else None
        if found is None:
            raise not_found()
        return found

    def child_folders(self, folder_id: str, *, include_hidden: bool = False) -> list[Folder]:
        folder = self.folder(folder_id)
        kids = [self.folders[c] for c in folder.children]
        return kids if include_hidden else [k for k in kids if not k.is_hidden]

    def top_folders(self, *, include_hidden: bool = False) -> list[Folder]:
        return self.child_folders(self.root_id, include_hidden=include_hidden)

    def all_folders(self) -> list[Folder]:
        """Every folder except the root, parents before children."""
        out: list[Folder] = []
        stack = list(reversed(self.folders[self.root_id].children))
        while stack:
            folder = self.folders[stack.pop()]
            out.append(folder)
            stack.extend(reversed(folder.children))
        return out

    def is_within(self, folder_id: str, ancestor_id: str) -> bool:
        while folder_id:
            if folder_id == ancestor_id:
                return True
            folder_id = self.folders[folder_id].parent_id
        return False

    def create_folder(self, parent_id: str, display_name: Any, *, is_hidden: bool = False) -> Folder:
        parent = self.folder(parent_id)
        _not_into_search_folder(parent)
        name = _folder_name(display_name)
        self._check_unique_name(parent, name)
        folder = self._new_folder(name, parent_id=parent.id, well_known=None, is_hidden=bool(is_hidden))
        self._emit(FolderChange(self.user_id, "created", folder.id, parent.id))
        return folder

    def rename_folder(self, folder_id: str, display_name: Any) -> Folder:
        folder = self.folder(folder_id)
        name = _folder_name(display_name)
        if folder.well_known:
            raise MailboxError(400, "ErrorInvalidRequest", "Distinguished folders cannot be renamed.")
        if name != folder.display_name:
            self._check_unique_name(self.folders[folder.parent_id], name, exclude=folder.id)
            folder.display_name = name
            self._touch_folder(folder)
        return folder

    def move_folder(self, folder_id: str, destination: str) -> Folder:
        folder = self.folder(folder_id)
        target = self.folder(destination)
        if folder.well_known:
            raise MailboxError(400, "ErrorInvalidRequest", "Distinguished folders cannot be moved.")
        if self.is_within(target.id, folder.id):
            raise MailboxError(400, "ErrorMoveCopyFailed", "A folder cannot be moved into itself or its subfolders.")
        _not_into_search_folder(target)
        if target.id != folder.parent_id:
            self._check_unique_name(target, folder.display_name)
            self.folders[folder.parent_id].children.remove(folder.id)
            target.children.append(folder.id)
            folder.parent_id = target.id
            self._touch_folder(folder)
        return folder

    def delete_folder(self, folder_id: str) -> None:
        """Move to Deleted Items; from inside Deleted Items, delete for good (with its messages)."""
        folder = self.folder(folder_id)
        if folder.well_known:
            raise MailboxError(400, "ErrorDeleteDistinguishedFolder", "Distinguished folders cannot be deleted.")
        if folder.search is not None:
            self._drop_search_folder(folder)   # a view: deleting it deletes no mail
            return
        deleted = self.well_known["deleteditems"]
        if not self.is_within(folder.id, deleted):
            self.move_folder(folder.id, deleted)
            return
        for sub in [folder.id, *self._descendants(folder.id)][::-1]:
            gone = self.folders[sub]
            for message in list(gone.messages.values()):
                self._drop_message(message)
            self.folders[gone.parent_id].children.remove(gone.id)
            del self.folders[gone.id]
            now = self._clock.time_ms()
            self.folder_index.remove(gone.id, Tombstone(gone.id, gone.id, self._next_seq(), now))
            self._emit(FolderChange(self.user_id, "deleted", gone.id, gone.parent_id))

    def _descendants(self, folder_id: str) -> list[str]:
        out: list[str] = []
        stack = list(self.folders[folder_id].children)
        while stack:
            fid = stack.pop()
            out.append(fid)
            stack.extend(self.folders[fid].children)
        return out

    def _check_unique_name(self, parent: Folder, name: str, exclude: str | None = None) -> None:
        lowered = name.lower()
        for cid in parent.children:
            if cid != exclude and self.folders[cid].display_name.lower() == lowered:
                raise MailboxError(409, "ErrorFolderExists", "A folder with the specified name already exists.")

    def _touch_folder(self, folder: Folder) -> None:
        folder.seq = self._next_seq()
        self.folder_index.touch(folder.id)
        self._emit(FolderChange(self.user_id, "updated", folder.id, folder.parent_id))

    # -- search folders ----------------------------------------------------------

    def create_search_folder(self, parent_id: str, display_name: Any, spec: SearchSpec, *,
                             emit: bool = True) -> Folder:
        """A ``mailSearchFolder`` under ``parent_id`` showing ``spec``'s messages (its sources must exist)."""
        parent = self.folder(parent_id)
        _not_into_search_folder(parent)
        name = _folder_name(display_name)
        sources = tuple(self.folder(source).id for source in spec.source_ids)
        if any(self.folders[s].search is not None for s in sources):
            raise MailboxError(400, "ErrorInvalidRequest", "A search folder cannot search another search folder.")
        self._check_unique_name(parent, name)
        folder = self._new_folder(name, parent_id=parent.id, well_known=None)
        folder.search = SearchSpec(sources, spec.include_nested, spec.filter_query)
        folder.last_used_ms = self._clock.time_ms()
        if emit:
            self._emit(FolderChange(self.user_id, "created", folder.id, parent.id))
        return folder

    def search_sources(self, folder: Folder) -> list[Folder]:
        """The real folders a search folder looks into (with their subfolders when nested)."""
        assert folder.search is not None
        found: dict[str, Folder] = {}
        for source_id in folder.search.source_ids:
            if source_id not in self.folders:
                continue   # a source deleted for good: the search shows less
            ids = [source_id, *self._descendants(source_id)] if folder.search.include_nested else [source_id]
            for fid in ids:
                if self.folders[fid].search is None:
                    found[fid] = self.folders[fid]
        return list(found.values())

    def search_members(self, folder: Folder) -> list[Message]:
        assert folder.search is not None
        matches = folder.search.matches
        return [m for source in self.search_sources(folder) for m in source.messages.values() if matches(m)]

    def folder_counts(self, folder: Folder) -> tuple[int, int]:
        """(totalItemCount, unreadItemCount) as Graph reports them (a search folder counts its matches)."""
        if folder.search is None:
            return len(folder.index), folder.unread
        members = self.search_members(folder)
        return len(members), sum(1 for m in members if not m.is_read)

    def folder_changes(self, folder: Folder, after: int, upto: int) -> Iterator[tuple[int, Message | Tombstone]]:
        """Changed entries of a folder with after < seq <= upto, in seq order (what delta pages).

        A search folder has no change index of its own: its changes are its
        sources' merged, a source message that no longer matches becomes a
        removal (it left the view), as Exchange's view would report it.
        """
        if folder.search is None:
            yield from folder.index.scan(after, upto)
            return
        matches = folder.search.matches
        streams = [source.index.scan(after, upto) for source in self.search_sources(folder)]
        for seq, entry in heapq.merge(*streams, key=lambda pair: pair[0]):
            if isinstance(entry, Tombstone) or matches(entry):
                yield seq, entry
            else:
                yield seq, Tombstone(entry.rest_id, entry.immutable_id, seq, 0)

    def search_folders(self) -> list[Folder]:
        return [f for f in self.folders.values() if f.search is not None]

    def expire_search_folders(self, now_ms: int, idle_ms: int) -> list[str]:
        """Delete search folders unused for ``idle_ms`` (Exchange does after 45 days); their ids."""
        gone = [f for f in self.search_folders() if now_ms - f.last_used_ms > idle_ms]
        for folder in gone:
            self._drop_search_folder(folder)
        return [f.id for f in gone]

    def _drop_search_folder(self, folder: Folder) -> None:
        self.folders[folder.parent_id].children.remove(folder.id)
        del self.folders[folder.id]
        self.folder_index.remove(folder.id, Tombstone(folder.id, folder.id, self._next_seq(), self._clock.time_ms()))
        self._emit(FolderChange(self.user_id, "deleted", folder.id, folder.parent_id))

    # -- messages: lookup ------------------------------------------------------

    def message(self, message_id: str) -> Message:
        """A message by REST id (current only) or immutable id, else 404."""
        found = self.by_rest.get(message_id) or self.by_immutable.get(message_id)
        if found is None:
            raise not_found()
        return found

    def all_messages(self) -> Iterator[Message]:
        for folder in self.folders.values():
            yield from folder.messages.values()

    def message_count(self) -> int:
        return len(self.by_rest)

    def messages_newest_first(self, folder_id: str | None) -> list[Message]:
        """Messages of a folder (or the whole mailbox) by receivedDateTime desc; cached per change."""
        if folder_id is None:
            if self._sorted_all is None or self._sorted_all[0] != self.members_version:
                self._sorted_all = (self.members_version, sorted(self.all_messages(), key=newest_first_key))
            return self._sorted_all[1]
        folder = self.folder(folder_id)
        if folder.search is not None:
            return sorted(self.search_members(folder), key=newest_first_key)
        cached = folder.sorted_cache
        if cached is None or cached[0] != folder.members_version:
            cached = (folder.members_version, sorted(folder.messages.values(), key=newest_first_key))
            folder.sorted_cache = cached
        return cached[1]

    # -- messages: changes -----------------------------------------------------

    def add_message(self, folder_id: str, *, emit: bool = True, **fields: Any) -> Message:
        """Create a message in ``folder_id`` from Message fields (ids, seq and times are assigned)."""
        folder = self.folder(folder_id)
        _not_into_search_folder(folder)
        self._serial += 1
        now = self._clock.time_ms()
        seq = self._next_seq()
        fields.setdefault("received_ms", now)
        fields.setdefault("sent_ms", fields["received_ms"])
        fields.setdefault("created_ms", fields["received_ms"])
        fields.setdefault("modified_ms", max(fields["created_ms"], now if emit else fields["created_ms"]))
        message = Message(immutable_id=self._immutable_id(self._serial), rest_id=self._rest_id(self._serial, 0),
                          folder_id=folder.id, seq=seq, entered_seq=seq, serial=self._serial, **fields)
        self._insert(folder, message)
        if emit:
            self._emit(MailChange(self.user_id, "created", message.rest_id, folder.id, message.immutable_id))
        return message

    def update_message(self, message: Message, changes: Mapping[str, Any]) -> Message:
        """Apply already-validated attribute changes (``is_read``, ``flag``, ...) as one change."""
        folder = self.folders[message.folder_id]
        changed = False
        for name, value in changes.items():
            if getattr(message, name) != value:
                if name == "is_read":
                    folder.unread += -1 if value else 1
                setattr(message, name, value)
                changed = True
        if not changed:
            return message   # Exchange does not bump the change key for a no-op PATCH
        self._bump(message)
        folder.index.touch(message.rest_id)
        if "received_ms" in changes:
            folder.members_version += 1
            self.members_version += 1
        self._emit(MailChange(self.user_id, "updated", message.rest_id, folder.id, message.immutable_id))
        return message

    def move_message(self, message: Message, destination: str) -> Message:
        """Move to another folder: new REST id, same immutable id."""
        target = self.folder(destination)
        if target.id == self.root_id:
            raise MailboxError(400, "ErrorInvalidRequest", "Messages cannot be moved to the root folder.")
        _not_into_search_folder(target)
        if target.id == message.folder_id:
            return message
        source = self.folders[message.folder_id]
        old_rest = message.rest_id
        self._detach(source, message)
        message.moves += 1
        message.rest_id = self._rest_id(message.serial, message.moves)
        message.folder_id = target.id
        self._bump(message)
        message.entered_seq = message.seq
        self._insert(target, message)
        self._emit(MailChange(self.user_id, "deleted", old_rest, source.id, message.immutable_id))
        self._emit(MailChange(self.user_id, "created", message.rest_id, target.id, message.immutable_id))
        return message

    def copy_message(self, message: Message, destination: str) -> Message:
        target = self.folder(destination)
        if target.id == self.root_id:
            raise MailboxError(400, "ErrorInvalidRequest", "Messages cannot be copied to the root folder.")
        _not_into_search_folder(target)
        fields = {name: getattr(message, name) for name in _COPIED_FIELDS}
        body, _ = self.body_of(message)
        fields["body_content"] = body
        fields["created_ms"] = self._clock.time_ms()
        return self.add_message(target.id, **fields)

    def delete_message(self, message: Message, *, permanently: bool = False) -> None:
        """Move to Deleted Items; a message already there (or ``permanently``) is deleted for good."""
        deleted = self.well_known["deleteditems"]
        if message.folder_id != deleted and not permanently:
            self.move_message(message, deleted)
            return
        folder = self.folders[message.folder_id]
        self._drop_message(message)
        self._emit(MailChange(self.user_id, "deleted", message.rest_id, folder.id, message.immutable_id))

    def remove_sent_draft(self, draft: Message) -> None:
        """A sent draft leaves Drafts (its content becomes the Sent Items copy)."""
        folder = self.folders[draft.folder_id]
        self._drop_message(draft)
        self._emit(MailChange(self.user_id, "deleted", draft.rest_id, folder.id, draft.immutable_id))

    def preview_of(self, message: Message) -> str:
        """bodyPreview without building the body when it is generated."""
        if message.preview is not None:
            return message.preview
        if message.body_content is None:
            from graph_sandbox.seed import generated_preview  # late: seed imports this module
            return generated_preview(message.body_seed)
        return _preview(message.body_content)

    def body_of(self, message: Message) -> tuple[str, str]:
        """(body HTML or text, preview) — generated from the seed when not stored."""
        if message.body_content is None:
            from graph_sandbox.seed import generated_body  # late: seed imports this module
            html, preview = generated_body(message.body_seed, message.subject)
            return html, message.preview if message.preview is not None else preview
        preview = message.preview if message.preview is not None else _preview(message.body_content)
        return message.body_content, preview

    def _bump(self, message: Message) -> None:
        message.seq = self._next_seq()
        message.version += 1
        # lastModifiedDateTime never goes back, even if the clock is odd.
        message.modified_ms = max(self._clock.time_ms(), message.modified_ms)

    def _insert(self, folder: Folder, message: Message) -> None:
        folder.index.put(message.rest_id, message)
        folder.members_version += 1
        self.members_version += 1
        if not message.is_read:
            folder.unread += 1
        self.by_rest[message.rest_id] = message
        self.by_immutable[message.immutable_id] = message

    def _detach(self, folder: Folder, message: Message) -> None:
        tomb = Tombstone(message.rest_id, message.immutable_id, self._next_seq(), self._clock.time_ms())
        folder.index.remove(message.rest_id, tomb)
        folder.members_version += 1
        self.members_version += 1
        if not message.is_read:
            folder.unread -= 1
        del self.by_rest[message.rest_id]

    def _drop_message(self, message: Message) -> None:
        self._detach(self.folders[message.folder_id], message)
        del self.by_immutable[message.immutable_id]


_SEND_DEFAULTS: dict[str, Any] = {
    "subject": "", "to": (), "cc": (), "bcc": (), "reply_to": (), "importance": "normal",
    "flag": {"flagStatus": "notFlagged"}, "categories": (), "has_attachments": False, "inference": "focused",
}

_COPIED_FIELDS = (
    "subject", "sender", "from_", "to", "cc", "bcc", "reply_to", "received_ms", "sent_ms", "is_read",
    "is_draft", "importance", "flag", "categories", "has_attachments", "internet_message_id",
    "conversation_id", "conversation_index", "inference", "body_type", "body_seed",
)


def newest_first_key(message: Message) -> tuple[int, int]:
    return (-message.received_ms, -message.serial)


def _preview(content: str) -> str:
    from graph_sandbox.seed import text_preview  # late: seed imports this module
    return text_preview(content)


def _not_into_search_folder(folder: Folder) -> None:
    if folder.search is not None:
        raise MailboxError(400, "ErrorInvalidRequest",
                           "A search folder shows messages of other folders; nothing can be put into it.")


def _folder_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MailboxError(400, "ErrorInvalidRequest", "The displayName of a folder must be a non-empty string.")
    if len(value) > 255:
        raise MailboxError(400, "ErrorInvalidRequest", "The displayName of a folder is limited to 255 characters.")
    return value.strip()


class Mailboxes:
    """All mailboxes of the tenant; global listeners survive resets."""

    def __init__(self, clock: SandboxClock) -> None:
        self._clock = clock
        self._listeners: list[Listener] = []
        self._boxes: dict[str, Mailbox] = {}
        self._by_address: dict[str, Mailbox] = {}
        self.epoch = 0

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(MailChange | FolderChange)`` after every change in any mailbox."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def listeners(self) -> list[Listener]:
        return self._listeners

    def replace_all(self, boxes: Iterable[Mailbox], *, epoch: int) -> None:
        self._boxes = {box.user_id: box for box in boxes}
        self._by_address = {box.address.lower(): box for box in self._boxes.values()}
        self.epoch = epoch

    def __getitem__(self, user_id: str) -> Mailbox:
        return self._boxes[user_id]

    def get(self, user_id: str) -> Mailbox | None:
        return self._boxes.get(user_id)

    def by_address(self, address: str) -> Mailbox | None:
        return self._by_address.get(address.lower())

    def __iter__(self) -> Iterator[Mailbox]:
        return iter(self._boxes.values())

    def __len__(self) -> int:
        return len(self._boxes)

    def new_mailbox(self, user_id: str, address: str, display_name: str, id_salt: str) -> Mailbox:
        return Mailbox(user_id, address, display_name, id_salt=id_salt, clock=self._clock,
                       listeners=self._listeners)

    def send_mail(self, sender: Mailbox, fields: dict[str, Any], *, save_to_sent: bool = True,
                  draft: Message | None = None) -> Message | None:
        """Send: a copy in the sender's Sent Items, one in each sandbox recipient's Inbox.

        ``fields`` are validated Message fields (subject, to, cc, bcc, body...).
        Recipients outside the tenant are accepted and go nowhere, as mail to
        the outside world would. Returns the Sent Items copy (if saved).
        """
        now = self._clock.time_ms()
        fields = {**_SEND_DEFAULTS, **fields}
        fields.update(sender=sender.me, from_=sender.me, received_ms=now, sent_ms=now, created_ms=now,
                      is_draft=False)
        domain = sender.address.split("@")[-1]
        local = sender._hash("imid", sender._serial + 1, now, size=12)[:16]
        fields.setdefault("internet_message_id", f"<{local}@{domain}>")
        fields.setdefault("conversation_id", sender._hash("conv", fields.get("subject", ""), now, size=33))
        fields.setdefault("conversation_index", base64.b64encode(now.to_bytes(8, "big") * 2 + b"\0" * 6).decode())
        sent: Message | None = None
        if draft is not None:
            sender.remove_sent_draft(draft)
        if save_to_sent:
            sent = sender.add_message(sender.well_known["sentitems"], **{**fields, "is_read": True})
        seen: set[str] = set()
        for rcpt in (*fields.get("to", ()), *fields.get("cc", ()), *fields.get("bcc", ())):
            address = rcpt["emailAddress"]["address"].lower()
            box = self._by_address.get(address)
            if box is None or address in seen:
                continue
            seen.add(address)
            inbox_fields = {**fields, "is_read": False, "bcc": ()}
            box.add_message(box.well_known["inbox"], **inbox_fields)
        return sent

