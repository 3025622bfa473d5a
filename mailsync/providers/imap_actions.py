"""The client half on IMAP: ``MessageActions`` over one IMAP connection of its own.

A message id is ``<folder key>.<UIDVALIDITY>.<UID>`` (mailsync.providers.imap);
an action names the folder the store has the message in, and the id must
belong to it: a key that is not the folder's, or a UIDVALIDITY the folder
no longer has, is ``NotFound`` (the message the id named is not there).

Acting (the folder SELECTed read-write, one command per kind of change):

* read / flag: ``UID STORE <set> +FLAGS.SILENT (\\Seen)`` / ``-FLAGS.SILENT``,
  the same with ``\\Flagged``. IMAP has no "complete" follow-up flag: it is
  ``-\\Flagged`` here (the store then reads notFlagged). All the messages of
  one folder getting the same change go in one ``UID STORE`` (500 marked
  read is one command).
* move: ``UID MOVE`` (RFC 6851) when offered, else ``UID COPY`` +
  ``UID STORE +FLAGS.SILENT (\\Deleted)`` + ``UID EXPUNGE`` (RFC 4315 UIDPLUS;
  a plain EXPUNGE would also expunge messages another client marked
  \\Deleted, so without UIDPLUS a move is refused). The ``COPYUID`` answer
  (untagged OK for MOVE, tagged for COPY) maps each UID to its UID in the
  target, which gives the moved message's new id.
* delete: to the ``\\Trash`` special-use folder (else a folder with one of
  the usual trash names) with a move; in the trash already, with
  ``permanent`` or with no trash folder: ``\\Deleted`` + ``UID EXPUNGE``.
* Idempotence: STORE of a flag the message has changes nothing; a UID that
  is not in the folder any more is done for a delete and ``NotFound`` for
  the rest (the caller's record of its own actions tells "moved by this
  action" from "gone").

Reading: ``EXAMINE`` (read-only: nothing here sets \\Seen), then one
``UID FETCH`` of FLAGS, INTERNALDATE, BODYSTRUCTURE and ``BODY.PEEK[HEADER]``;
the body is the first ``text/html`` part not marked attachment (else the
first ``text/plain``), fetched alone with ``BODY.PEEK[<part>]<0.N>`` and
decoded (transfer encoding, charset). Attachments are the other leaf parts
with a file name or an attachment disposition, and inline images with a
Content-ID; their id is the IMAP part number (``2``, ``1.2``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mailsync.actions.models import (
    ActionOutcome,
    AttachmentContent,
    AttachmentInfo,
    MessageAction,
    MessageContent,
)
from mailsync.errors import MailsyncError, NotFound, PayloadTooLarge, ProviderError
from mailsync.models import Account, Address, FlagStatus
from mailsync.providers.imap import ROLE_OF_NAME, ImapProviderFactory, folder_key, message_id_of
from mailsync.providers.imap_cursor import uid_set
from mailsync.providers.imap_mapping import (
    AddressCache,
    _charset_decode,
    _transfer_decode,
    decode_header_value,
    map_message,
    parse_header_block,
)
from mailsync.providers.imap_session import ImapSession, LazySession

BODY_MAX_BYTES = 2 * 1024 * 1024
_COPYUID = re.compile(rb"COPYUID (\d+) ([0-9:,]+) ([0-9:,]+)")
SEEN, FLAGGED, DELETED = b"\\Seen", b"\\Flagged", b"\\Deleted"


@dataclass(frozen=True)
class Part:
    """One leaf of a BODYSTRUCTURE."""

    number: str
    content_type: str
    params: dict[str, str]
    encoding: str
    size: int
    disposition: str
    filename: str
    content_id: str | None

    @property
    def is_attachment(self) -> bool:
        if self.disposition == "attachment":
            return True
        if self.content_type in ("text/plain", "text/html") and not self.filename:
            return False
        return bool(self.filename) or self.content_id is not None or not self.content_type.startswith("text/")


def parse_message_id(folder_id: str, message_id: str) -> tuple[int, int]:
    """(UIDVALIDITY, UID) of an id of ``folder_id``; NotFound when the id is not one of that folder's."""
    parts = message_id.split(".")
    if len(parts) != 3 or parts[0] != folder_key(folder_id) or not parts[1].isdigit() or not parts[2].isdigit():
        raise NotFound("no such message in that folder")
    return int(parts[1]), int(parts[2])


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _params(raw: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    if isinstance(raw, (tuple, list)):
        for key, value in zip(raw[::2], raw[1::2], strict=False):
            raw_value = value if isinstance(value, bytes) else _text(value).encode()
            found[_text(key).lower()] = decode_header_value(raw_value)
    return found


def walk_structure(structure: Any, prefix: str = "") -> list[Part]:
    """The leaf parts of an imapclient BODYSTRUCTURE, numbered as ``BODY[<part>]`` wants them."""
    if getattr(structure, "is_multipart", False):
        parts: list[Part] = []
        for n, child in enumerate(structure[0], start=1):
            parts.extend(walk_structure(child, f"{prefix}{n}."))
        return parts
    number = prefix.rstrip(".") or "1"
    main, sub = _text(structure[0]).lower(), _text(structure[1]).lower()
    ctype = f"{main}/{sub}"
    params = _params(structure[2])
    content_id = _text(structure[3]).strip("<>") or None
    encoding = _text(structure[5]).lower()
    size = int(structure[6]) if isinstance(structure[6], int) else 0
    if main == "text":
        disposition_at = 9
    elif ctype == "message/rfc822":
        disposition_at = 11
    else:
        disposition_at = 8
    disposition, filename = "", params.get("name", "")
    if len(structure) > disposition_at and isinstance(structure[disposition_at], (tuple, list)):
        raw = structure[disposition_at]
        disposition = _text(raw[0]).lower()
        extra = _params(raw[1]) if len(raw) > 1 else {}
        filename = extra.get("filename") or extra.get("filename*") or filename
    return [Part(number=number, content_type=ctype, params=params, encoding=encoding, size=size,
                 disposition=disposition, filename=filename, content_id=content_id)]


def _expand(text: bytes) -> list[int]:
    found: list[int] = []
    for piece in text.split(b","):
        first, _, last = piece.partition(b":")
        start, end = int(first), int(last or first)
        found.extend(range(min(start, end), max(start, end) + 1))
    return found


class ImapActions:
    """``MessageActions`` for one IMAP account (its own connection, opened lazily, reopened after a fault)."""

    def __init__(self, connect: Callable[[], ImapSession], account_id: str) -> None:
        self._account_id = account_id
        self._session = LazySession(connect, ("CONDSTORE",))
        self._addresses = AddressCache()
        self._trash: str | bool | None = False   # False: not looked up yet
        self._by_key: dict[str, str] | None = None   # folder key -> folder name (LIST), looked up once if needed

    def close(self) -> None:
        self._session.close()

    def _folder_of(self, session: ImapSession, folder_id: str, message_id: str) -> str:
        """The folder ``message_id`` names, which is not always ``folder_id``, the store row's folder.

        An IMAP id carries its folder's key, and the store shows a message moved here at once under the
        id it had, in the folder it is going to (the optimistic row) — until the move's job has run. A
        second action taken on that row (delete it for good, flag it) names the destination: there the id
        is no message, and a delete answered "done, it is gone" while the message sat on in its folder;
        the move, superseded by the delete, never ran either: the store lost the message for good (the
        IMAP convergence test's every-fault scenario). So the folder is found from the key (one LIST,
        then remembered); an unknown key leaves ``folder_id`` (deleted or renamed: ``NotFound`` as before).
        """
        key = message_id.split(".", 1)[0]
        if key == folder_key(folder_id):
            return folder_id
        if self._by_key is None:
            self._by_key = {folder_key(e.name): e.name for e in session.list_mailboxes(status_items=())}
        return self._by_key.get(key, folder_id)

    # --- reading --------------------------------------------------------------------------------

    def _fetch_one(self, session: ImapSession, folder_id: str, message_id: str, items: str) -> dict[bytes, Any]:
        validity, uid = parse_message_id(folder_id, message_id)
        info = session.examine(folder_id)
        if info.uidvalidity != validity:
            raise NotFound("no such message in that folder")
        fetched = session.uid_fetch(str(uid), items)
        if uid not in fetched:
            raise NotFound("no such message in that folder")
        return fetched[uid]

    def read_message(self, folder_id: str, message_id: str) -> MessageContent:
        with self._session.use() as session:
            folder_id = self._folder_of(session, folder_id, message_id)
            items = "UID FLAGS INTERNALDATE BODYSTRUCTURE BODY.PEEK[HEADER]"
            if session.has("CONDSTORE"):
                items += " MODSEQ"
            item = self._fetch_one(session, folder_id, message_id, items)
            header_block = next((v for k, v in item.items() if k.startswith(b"BODY[HEADER")), None)
            parts = walk_structure(item[b"BODYSTRUCTURE"])
            body_part = (next((p for p in parts if p.content_type == "text/html" and not p.is_attachment), None)
                         or next((p for p in parts if p.content_type == "text/plain" and not p.is_attachment), None))
            body, body_type = "", "text"
            if body_part is not None:
                uid = parse_message_id(folder_id, message_id)[1]
                name = f"BODY[{body_part.number}]<0>"
                raw = session.uid_fetch(str(uid), f"UID BODY.PEEK[{body_part.number}]<0.{BODY_MAX_BYTES}>").get(uid, {})
                data = raw.get(name.encode()) or next((v for k, v in raw.items() if k.startswith(b"BODY[")), b"")
                decoded = _transfer_decode(data if isinstance(data, bytes) else b"", body_part.encoding)
                body = _charset_decode(decoded, body_part.params.get("charset") or "utf-8")
                body_type = "html" if body_part.content_type == "text/html" else "text"
        modseq = item.get(b"MODSEQ")
        version = int(modseq[0]) if isinstance(modseq, tuple) and modseq else 0
        message = map_message(account_id=self._account_id, folder_id=folder_id, message_id=message_id,
                              version=version, flags=tuple(item.get(b"FLAGS") or ()),
                              internal_date=item.get(b"INTERNALDATE"),
                              header_block=header_block if isinstance(header_block, bytes) else None,
                              text=None, addresses=self._addresses)
        reply_raw = parse_header_block(header_block if isinstance(header_block, bytes) else None,
                                       frozenset({b"reply-to"})).get(b"reply-to")
        reply_to: tuple[Address, ...] = self._addresses.parse(reply_raw) if reply_raw else ()
        attachments = tuple(_info(p) for p in parts if p.is_attachment and p is not body_part)
        return MessageContent(message=message, reply_to=reply_to, body=body, body_type=body_type,
                              attachments=attachments)

    def read_attachment(self, folder_id: str, message_id: str, attachment_id: str, *,
                        max_bytes: int) -> AttachmentContent:
        if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){0,8}", attachment_id):
            raise NotFound("no such attachment")
        with self._session.use() as session:
            folder_id = self._folder_of(session, folder_id, message_id)
            item = self._fetch_one(session, folder_id, message_id, "UID BODYSTRUCTURE")
            part = next((p for p in walk_structure(item[b"BODYSTRUCTURE"]) if p.number == attachment_id), None)
            if part is None:
                raise NotFound("no such attachment")
            # BODYSTRUCTURE gives the encoded size: base64 is 4/3 of the content plus line breaks.
            if part.size > max_bytes * 1.4 + 1024:
                raise PayloadTooLarge(f"the attachment is over the {max_bytes} bytes this server sends",
                                      code="attachment_too_large")
            uid = parse_message_id(folder_id, message_id)[1]
            raw = session.uid_fetch(str(uid), f"UID BODY.PEEK[{attachment_id}]").get(uid, {})
        data = next((v for k, v in raw.items() if k.startswith(b"BODY[")), b"")
        content = _transfer_decode(data if isinstance(data, bytes) else b"", part.encoding)
        if len(content) > max_bytes:
            raise PayloadTooLarge(f"the attachment is over the {max_bytes} bytes this server sends",
                                  code="attachment_too_large")
        return AttachmentContent(info=_info(part), content=content)

    # --- acting ----------------------------------------------------------------------------------

    def apply(self, actions: Sequence[MessageAction], *, parallel: int = 1) -> list[ActionOutcome]:
        # ``parallel`` is for providers whose requests can overlap; one connection sends one command at a time.
        outcomes: dict[int, ActionOutcome] = {}
        by_folder: dict[str, list[tuple[int, int, int]]] = {}
        try:
            with self._session.use() as session:
                located = [self._folder_of(session, a.folder_id, a.message_id) for a in actions]
        except MailsyncError as exc:
            return [ActionOutcome(action=a, done=False, error=exc) for a in actions]
        for n, action in enumerate(actions):
            try:
                validity, uid = parse_message_id(located[n], action.message_id)
            except NotFound as exc:
                outcomes[n] = _missing(action, exc)
                continue
            by_folder.setdefault(located[n], []).append((n, validity, uid))
        for folder_id, items in by_folder.items():
            try:
                # A session per folder's turn: one a fault killed is opened again for the next folder.
                with self._session.use() as session:
                    self._apply_folder(session, folder_id, items, actions, outcomes)
            except MailsyncError as exc:
                for n, _v, _u in items:
                    outcomes.setdefault(n, ActionOutcome(action=actions[n], done=False, error=exc))
        return [outcomes[n] for n in range(len(actions))]

    def _apply_folder(self, session: ImapSession, folder_id: str, items: list[tuple[int, int, int]],
                      actions: Sequence[MessageAction], outcomes: dict[int, ActionOutcome]) -> None:
        trash = self._trash_folder(session) if any(actions[n].delete for n, _v, _u in items) else None
        try:
            validity = self._select(session, folder_id)
        except NotFound as exc:
            for n, _v, _u in items:
                outcomes[n] = _missing(actions[n], exc)
            return
        present = set(session.uid_search(f"UID {uid_set(u for _n, _v, u in items)}"))
        live: list[tuple[int, int]] = []
        for n, item_validity, uid in items:
            if item_validity != validity or uid not in present:
                outcomes[n] = _missing(actions[n], NotFound("the message is not in that folder any more"))
            else:
                live.append((n, uid))
        # Flags first (an action may update then move), one STORE per flag and direction.
        for flag in (SEEN, FLAGGED):
            for on in (True, False):
                uids = [uid for n, uid in live if not actions[n].delete and _wanted(actions[n], flag) is on]
                if uids:
                    self._store(session, uids, flag, on)
        expunge: list[tuple[int, int]] = []
        moves: dict[str, list[tuple[int, int]]] = {}
        for n, uid in live:
            action = actions[n]
            if action.delete:
                if action.permanent or trash is None or trash == folder_id:
                    expunge.append((n, uid))
                else:
                    moves.setdefault(str(trash), []).append((n, uid))
            elif action.destination is not None and action.destination != folder_id:
                moves.setdefault(action.destination, []).append((n, uid))
        for target, moving in moves.items():
            mapping, target_validity = self._move(session, [uid for _n, uid in moving], target)
            for n, uid in moving:
                action = actions[n]
                new_uid = mapping.get(uid)
                if action.delete:
                    outcomes[n] = ActionOutcome(action=action, done=True, gone=True)
                else:
                    outcomes[n] = ActionOutcome(
                        action=action, done=True, folder_id=target,
                        message_id=message_id_of(target, target_validity, new_uid) if new_uid else None)
        if expunge:
            uids = [uid for _n, uid in expunge]
            self._store(session, uids, DELETED, True)
            self._uid_expunge(session, uids)
            for n, _uid in expunge:
                outcomes[n] = ActionOutcome(action=actions[n], done=True, gone=True)
        for n, _uid in live:
            outcomes.setdefault(n, ActionOutcome(action=actions[n], done=True, message_id=actions[n].message_id,
                                                 folder_id=folder_id))

    def _select(self, session: ImapSession, folder_id: str) -> int:
        """SELECT read-write (EXAMINE cannot STORE); the folder's UIDVALIDITY."""
        session.selected = None   # the provider's EXAMINE cache must not think this is still read-only
        with session.errors(f"SELECT {folder_id}"):
            answer = session.client.select_folder(folder_id)
        return int(answer[b"UIDVALIDITY"])

    def _store(self, session: ImapSession, uids: list[int], flag: bytes, on: bool) -> None:
        with session.errors("UID STORE"):
            if on:
                session.client.add_flags(uids, [flag], silent=True)
            else:
                session.client.remove_flags(uids, [flag], silent=True)

    def _uid_expunge(self, session: ImapSession, uids: list[int]) -> None:
        if not session.has("UIDPLUS"):
            raise ProviderError("the IMAP server offers no UID EXPUNGE (UIDPLUS): deleting could expunge other "
                                "messages marked deleted", code="imap_no_uidplus")
        with session.errors("UID EXPUNGE"):
            session.client.uid_expunge(uids)

    def _move(self, session: ImapSession, uids: list[int], target: str) -> tuple[dict[int, int], int]:
        """UID MOVE (else COPY + \\Deleted + UID EXPUNGE); the COPYUID map and the target's UIDVALIDITY."""
        imap = session.client._imap
        folder = session.client._normalise_folder(target)
        command = "MOVE" if session.has("MOVE") else "COPY"
        if command == "COPY" and not session.has("UIDPLUS"):
            raise ProviderError("the IMAP server offers neither MOVE nor UIDPLUS: a move cannot be done safely",
                                code="imap_no_move")
        with session.errors(f"UID {command}"):
            imap.untagged_responses = {}
            typ, data = imap._simple_command("UID", command, uid_set(uids), folder)
            if typ != "OK":
                raise NotFound(f"UID {command} refused: {_text(data[0] if data else b'')[:200]}")
            lines = [*(imap.untagged_responses.pop("COPYUID", []) or []),
                     *(imap.untagged_responses.pop("OK", []) or []), *(d for d in data if isinstance(d, bytes))]
            imap.untagged_responses = {}
        mapping: dict[int, int] = {}
        target_validity = 0
        for line in lines:
            text = line if isinstance(line, bytes) else _text(line).encode()
            if re.match(rb"\d+ [0-9:,]+ [0-9:,]+", text):   # imaplib files "* OK [COPYUID ...]" under COPYUID
                text = b"COPYUID " + text
            match = _COPYUID.search(text)
            if match:
                target_validity = int(match.group(1))
                mapping.update(zip(_expand(match.group(2)), _expand(match.group(3)), strict=False))
        if command == "COPY":
            self._store(session, uids, DELETED, True)
            self._uid_expunge(session, uids)
        if not target_validity:
            target_validity = session.status(target, ["UIDVALIDITY"]).get("UIDVALIDITY", 0)
        return mapping, target_validity

    def _trash_folder(self, session: ImapSession) -> str | None:
        if self._trash is False:
            entries = session.list_mailboxes(status_items=())
            special = next((e.name for e in entries if "\\trash" in e.flags), None)
            by_name = next((e.name for e in entries if ROLE_OF_NAME.get(e.name.lower()) == "deleteditems"), None)
            self._trash = special or by_name
        return self._trash if isinstance(self._trash, str) else None


def _wanted(action: MessageAction, flag: bytes) -> bool | None:
    """Whether the action wants ``flag`` set (True), cleared (False), or leaves it (None)."""
    if flag == SEEN:
        return action.is_read
    return None if action.flag_status is None else action.flag_status == FlagStatus.FLAGGED


def _missing(action: MessageAction, error: MailsyncError) -> ActionOutcome:
    if action.delete:
        return ActionOutcome(action=action, done=True, gone=True, absent=True)   # deleting what is gone is done
    return ActionOutcome(action=action, done=False, error=error)


def _decoded_size(part: Part) -> int:
    """About the attachment's size: BODYSTRUCTURE counts encoded octets (base64: 57 bytes per 78-octet line)."""
    if part.encoding == "base64":
        return part.size * 57 // 78
    return part.size


def _info(part: Part) -> AttachmentInfo:
    extension = part.content_type.split("/", 1)[1] if "/" in part.content_type else "bin"
    name = part.filename or f"part-{part.number}.{extension}"
    return AttachmentInfo(attachment_id=part.number, name=name, content_type=part.content_type,
                          size=_decoded_size(part),
                          is_inline=part.disposition != "attachment" and part.content_id is not None,
                          content_id=part.content_id)


class ImapActionsFactory:
    """``MessageActionsFactory`` for IMAP accounts (connections made like the sync provider's)."""

    def __init__(self, providers: ImapProviderFactory) -> None:
        self._providers = providers

    def open_actions(self, account: Account) -> ImapActions:
        account_id = account.account_id
        return ImapActions(lambda: self._providers.connect(account_id), account_id)
