"""The only place that turns sandbox objects into Graph JSON.

Every property emitted here is declared by Microsoft's CSDL for that type
(``tests/graph_sandbox/test_schema.py`` checks the live server's answers
against ``../shared/graph/v1.0-Prod.csdl``). Notably absent because v1.0
does not declare them: ``mailFolder.wellKnownName`` and ``sizeInBytes``
(beta only).

Shapes follow what Graph sends: ``@odata.etag`` on each message (the
change key), ``@odata.type`` on delta items, ``@removed`` entries with only
an id, and the ``{"error": {code, message, innerError}}`` envelope.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from graph_sandbox.mailbox import Folder, Mailbox, Message, iso
from graph_sandbox.seed import html_to_text

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxUser

MESSAGE_TYPE = "#microsoft.graph.message"
FOLDER_TYPE = "#microsoft.graph.mailFolder"
SEARCH_FOLDER_TYPE = "#microsoft.graph.mailSearchFolder"
REMOVED = {"reason": "deleted"}


def _web_link(message_id: str) -> str:
    # Our ids are URL-safe base64: only the padding needs escaping (quote() is slow per message).
    item = message_id.replace("=", "%3D") if _URLSAFE.fullmatch(message_id) else quote(message_id, safe="")
    return f"https://outlook.office365.com/owa/?ItemID={item}&exvsurl=1&viewmodel=ReadMessageItem"


_URLSAFE = re.compile(r"[A-Za-z0-9_\-=]*")


def _body(m: Message, box: Mailbox) -> dict[str, str]:
    content, _ = box.body_of(m)
    return {"contentType": m.body_type, "content": content}


def _preview_of(m: Message, box: Mailbox) -> str:
    return box.preview_of(m)


# $select-able message properties -> value getter (m, mailbox, id).
MESSAGE_FIELDS: dict[str, Callable[[Message, Mailbox, str], Any]] = {
    "id": lambda m, b, i: i,
    "createdDateTime": lambda m, b, i: iso(m.created_ms),
    "lastModifiedDateTime": lambda m, b, i: iso(m.modified_ms),
    "changeKey": lambda m, b, i: m.change_key,
    "categories": lambda m, b, i: list(m.categories),
    "receivedDateTime": lambda m, b, i: iso(m.received_ms),
    "sentDateTime": lambda m, b, i: iso(m.sent_ms),
    "hasAttachments": lambda m, b, i: m.has_attachments,
    "internetMessageId": lambda m, b, i: m.internet_message_id,
    "subject": lambda m, b, i: m.subject,
    "bodyPreview": lambda m, b, i: _preview_of(m, b),
    "importance": lambda m, b, i: m.importance,
    "parentFolderId": lambda m, b, i: m.folder_id,
    "conversationId": lambda m, b, i: m.conversation_id,
    "conversationIndex": lambda m, b, i: m.conversation_index,
    "isDeliveryReceiptRequested": lambda m, b, i: False,
    "isReadReceiptRequested": lambda m, b, i: False,
    "isRead": lambda m, b, i: m.is_read,
    "isDraft": lambda m, b, i: m.is_draft,
    "webLink": lambda m, b, i: _web_link(i),
    "inferenceClassification": lambda m, b, i: m.inference,
    "body": lambda m, b, i: _body(m, b),
    "sender": lambda m, b, i: m.sender,
    "from": lambda m, b, i: m.from_,
    "toRecipients": lambda m, b, i: list(m.to),
    "ccRecipients": lambda m, b, i: list(m.cc),
    "bccRecipients": lambda m, b, i: list(m.bcc),
    "replyTo": lambda m, b, i: list(m.reply_to),
    "flag": lambda m, b, i: m.flag,
}
MESSAGE_SELECTABLE = frozenset(MESSAGE_FIELDS)
_LOWER_MESSAGE_FIELDS = {name.lower(): name for name in MESSAGE_FIELDS}


def message_select(names: Iterable[str]) -> tuple[str, ...]:
    """Canonical names for a ``$select`` list (Graph matches them case-insensitively).

    Raises KeyError with the first unknown name.
    """
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        canonical = _LOWER_MESSAGE_FIELDS.get(name.lower())
        if canonical is None:
            raise KeyError(name)
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


def _body_as(m: Message, box: Mailbox, text_body: bool) -> dict[str, str]:
    content, _ = box.body_of(m)
    if text_body and m.body_type == "html":
        return {"contentType": "text", "content": html_to_text(content)}
    return {"contentType": m.body_type, "content": content}


def message(m: Message, box: Mailbox, *, immutable: bool, select: tuple[str, ...] | None = None,
            odata_type: bool = False, text_body: bool = False) -> dict[str, Any]:
    """A message as Graph returns it.

    ``immutable`` picks the id form (``Prefer: IdType="ImmutableId"``),
    ``select`` limits properties (``id`` always comes), ``text_body`` answers
    ``Prefer: outlook.body-content-type="text"``.
    """
    mid = m.immutable_id if immutable else m.rest_id
    change_key = m.change_key
    out: dict[str, Any] = {"@odata.type": MESSAGE_TYPE} if odata_type else {}
    out["@odata.etag"] = f'W/"{change_key}"'
    if select is not None:
        out["id"] = mid
        for name in select:
            if name == "body":
                out[name] = _body_as(m, box, text_body)
            elif name != "id":
                out[name] = MESSAGE_FIELDS[name](m, box, mid)
        return out
    content, preview = box.body_of(m)
    body_type = m.body_type
    if text_body and body_type == "html":
        content, body_type = html_to_text(content), "text"
    out.update({
        "id": mid,
        "createdDateTime": iso(m.created_ms),
        "lastModifiedDateTime": iso(m.modified_ms),
        "changeKey": change_key,
        "categories": list(m.categories),
        "receivedDateTime": iso(m.received_ms),
        "sentDateTime": iso(m.sent_ms),
        "hasAttachments": m.has_attachments,
        "internetMessageId": m.internet_message_id,
        "subject": m.subject,
        "bodyPreview": preview,
        "importance": m.importance,
        "parentFolderId": m.folder_id,
        "conversationId": m.conversation_id,
        "conversationIndex": m.conversation_index,
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": False,
        "isRead": m.is_read,
        "isDraft": m.is_draft,
        "webLink": _web_link(mid),
        "inferenceClassification": m.inference,
        "body": {"contentType": body_type, "content": content},
    })
    if m.sender is not None:
        out["sender"] = m.sender
    if m.from_ is not None:
        out["from"] = m.from_
    out["toRecipients"] = list(m.to)
    out["ccRecipients"] = list(m.cc)
    out["bccRecipients"] = list(m.bcc)
    out["replyTo"] = list(m.reply_to)
    out["flag"] = m.flag
    return out


def removed(item_id: str, *, odata_type: str = MESSAGE_TYPE) -> dict[str, Any]:
    """A delta entry for something that left the collection."""
    return {"@odata.type": odata_type, "id": item_id, "@removed": REMOVED}


FOLDER_FIELDS = ("id", "displayName", "parentFolderId", "childFolderCount", "unreadItemCount",
                 "totalItemCount", "isHidden")
_LOWER_FOLDER_FIELDS = {name.lower(): name for name in FOLDER_FIELDS}


def folder_select(names: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        canonical = _LOWER_FOLDER_FIELDS.get(name.lower())
        if canonical is None:
            raise KeyError(name)
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


def mail_folder(f: Folder, box: Mailbox, *, select: tuple[str, ...] | None = None,
                odata_type: bool = False) -> dict[str, Any]:
    """A mailFolder; a search folder is a ``mailSearchFolder``, which OData always annotates with its
    ``@odata.type`` in a collection of the base type (that is how a client can tell them apart)."""
    total, unread = box.folder_counts(f)
    full: dict[str, Any] = {
        "id": f.id,
        "displayName": f.display_name,
        "parentFolderId": f.parent_id,
        "childFolderCount": len(f.children),
        "unreadItemCount": unread,
        "totalItemCount": total,
        "isHidden": f.is_hidden,
    }
    if select is not None:
        full = {k: v for k, v in full.items() if k == "id" or k in select}
    if f.search is not None:
        if select is None:
            full.update(isSupported=True, includeNestedFolders=f.search.include_nested,
                        sourceFolderIds=list(f.search.source_ids), filterQuery=f.search.filter_query)
        return {"@odata.type": SEARCH_FOLDER_TYPE, **full}
    return {"@odata.type": FOLDER_TYPE, **full} if odata_type else full


def user(u: SandboxUser) -> dict[str, Any]:
    """A user with the properties Graph returns by default for GET /me."""
    return {
        "businessPhones": list(u.business_phones),
        "displayName": u.display_name,
        "givenName": u.given_name,
        "jobTitle": u.job_title,
        "mail": u.mail,
        "mobilePhone": u.mobile_phone,
        "officeLocation": u.office_location,
        "preferredLanguage": u.preferred_language,
        "surname": u.surname,
        "userPrincipalName": u.user_principal_name,
        "id": u.id,
    }


def collection(context: str, value: list[Any], *, next_link: str | None = None,
               delta_link: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"@odata.context": context, "value": value}
    if next_link is not None:
        out["@odata.nextLink"] = next_link
    if delta_link is not None:
        out["@odata.deltaLink"] = delta_link
    return out


def error(code: str, message: str, *, request_id: str, client_request_id: str, date: str) -> dict[str, Any]:
    """Graph's error envelope."""
    return {"error": {"code": code, "message": message,
                      "innerError": {"date": date, "request-id": request_id, "client-request-id": client_request_id}}}
