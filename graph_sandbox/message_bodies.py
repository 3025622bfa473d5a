"""Request bodies of the mail API: a message PATCH, a new message or draft, and their parts.

Checked against the CSDL's ``microsoft.graph.message``: what may be changed
always (read state, flag, categories...), only on a draft (subject, body,
recipients), and never (ids, dates, ``from``); each refusal is Graph's 400.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.mailbox import FLAG_STATUS, IMPORTANCE, INFERENCE, Mailbox, Message, iso, recipient
from graph_sandbox.seed import text_preview

_ALWAYS_UPDATABLE = {"isRead", "flag", "categories", "importance", "inferenceClassification"}
_DRAFT_UPDATABLE = {"subject", "body", "toRecipients", "ccRecipients", "bccRecipients", "replyTo"}
_READ_ONLY = {"id", "changeKey", "createdDateTime", "lastModifiedDateTime", "parentFolderId", "conversationId",
              "conversationIndex", "webLink", "receivedDateTime", "sentDateTime", "isDraft", "hasAttachments",
              "internetMessageId", "bodyPreview", "sender", "from", "uniqueBody", "isDeliveryReceiptRequested",
              "isReadReceiptRequested"}


def message_changes(body: dict[str, Any], message: Message, now_ms: int) -> dict[str, Any]:
    """Validate a PATCH body into Message attribute changes."""
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key in _ALWAYS_UPDATABLE:
            pass
        elif key in _DRAFT_UPDATABLE:
            if not message.is_draft:
                raise ApiError(400, "ErrorInvalidPropertyUpdateSentMessage",
                               "Update operation is not supported for some properties of a sent message.")
        elif key in _READ_ONLY:
            continue          # Graph ignores read-only properties on PATCH
        else:
            raise ApiError(400, "RequestBodyRead",
                           f"The property '{key}' does not exist on type 'microsoft.graph.message'. "
                           "Make sure to only use property names that are defined by the type.")
        if key == "isRead":
            changes["is_read"] = _bool(value, key)
        elif key == "flag":
            changes["flag"] = parse_flag(value, now_ms)
        elif key == "categories":
            changes["categories"] = _categories(value)
        elif key == "importance":
            changes["importance"] = _enum(value, IMPORTANCE, key)
        elif key == "inferenceClassification":
            changes["inference"] = _enum(value, INFERENCE, key)
        elif key == "subject":
            changes["subject"] = _string(value, key)
        elif key == "body":
            content, content_type = parse_body(value)
            changes["body_content"], changes["body_type"] = content, content_type
            changes["preview"] = None
        else:
            attr = {"toRecipients": "to", "ccRecipients": "cc", "bccRecipients": "bcc", "replyTo": "reply_to"}[key]
            changes[attr] = parse_recipients(value, key)
    return changes


def new_message_fields(body: dict[str, Any], box: Mailbox) -> dict[str, Any]:
    """Fields of a new draft (POST /messages) or of a message to send (sendMail)."""
    allowed = _ALWAYS_UPDATABLE | _DRAFT_UPDATABLE
    for key in body:
        if key not in allowed and key not in _READ_ONLY:
            raise ApiError(400, "RequestBodyRead",
                           f"The property '{key}' does not exist on type 'microsoft.graph.message'. "
                           "Make sure to only use property names that are defined by the type.")
    content, content_type = parse_body(body.get("body", {"contentType": "text", "content": ""}))
    subject = _string(body.get("subject", ""), "subject")
    fields: dict[str, Any] = {
        "subject": subject,
        "sender": box.me,
        "from_": box.me,
        "to": parse_recipients(body.get("toRecipients", []), "toRecipients"),
        "cc": parse_recipients(body.get("ccRecipients", []), "ccRecipients"),
        "bcc": parse_recipients(body.get("bccRecipients", []), "bccRecipients"),
        "reply_to": parse_recipients(body.get("replyTo", []), "replyTo"),
        "is_read": True,
        "is_draft": True,
        "importance": _enum(body.get("importance", "normal"), IMPORTANCE, "importance"),
        "flag": parse_flag(body.get("flag", {"flagStatus": "notFlagged"}), 0),
        "categories": _categories(body.get("categories", [])),
        "has_attachments": False,
        "internet_message_id": f"<{uuid.uuid4().hex[:16]}@{box.address.split('@')[-1]}>",
        "conversation_id": box._hash("conv", subject, uuid.uuid4().hex, size=33),
        "conversation_index": base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes[:6]).decode("ascii"),
        "inference": "focused",
        "body_content": content,
        "body_type": content_type,
        "preview": text_preview(content) if content_type == "html" else content[:255],
    }
    return fields


def require_recipients(fields: dict[str, Any]) -> None:
    if not (fields.get("to") or fields.get("cc") or fields.get("bcc")):
        raise ApiError(400, "ErrorInvalidRecipients", "At least one recipient is required, but none were found.")


def parse_recipients(value: Any, name: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise bad_request(f"{name} must be an array of recipients.")
    out = []
    for item in value:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        address = email.get("address") if isinstance(email, dict) else None
        if not isinstance(address, str) or "@" not in address.strip() or len(address) > 320:
            raise ApiError(400, "ErrorInvalidRecipients",
                           f"At least one recipient in {name} is not valid: an emailAddress.address is required.")
        display = email.get("name") or address
        if not isinstance(display, str):
            raise bad_request(f"{name}: emailAddress.name must be a string.")
        out.append(recipient(address.strip(), display))
    return tuple(out)


def parse_body(value: Any) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise bad_request("body must be an itemBody object.")
    content = value.get("content", "")
    content_type = str(value.get("contentType", "text")).lower()
    if not isinstance(content, str) or content_type not in ("text", "html"):
        raise bad_request("body needs a string content and a contentType of text or html.")
    return content, content_type


def parse_flag(value: Any, now_ms: int) -> dict[str, Any]:
    """A followupFlag; Outlook fills start/due (flagged) or completed (complete) when absent."""
    if not isinstance(value, dict):
        raise bad_request("flag must be a followupFlag object.")
    unknown = set(value) - {"flagStatus", "startDateTime", "dueDateTime", "completedDateTime"}
    if unknown:
        raise ApiError(400, "RequestBodyRead", f"The property '{sorted(unknown)[0]}' does not exist on type "
                                               "'microsoft.graph.followupFlag'.")
    status = _enum(value.get("flagStatus", "notFlagged"), FLAG_STATUS, "flagStatus")
    flag: dict[str, Any] = {"flagStatus": status}
    for name in ("startDateTime", "dueDateTime", "completedDateTime"):
        if value.get(name) is not None:
            flag[name] = _date_time_time_zone(value[name], name)
    if now_ms and status == "flagged":
        flag.setdefault("startDateTime", _dttz(now_ms))
        flag.setdefault("dueDateTime", _dttz(now_ms))
    if now_ms and status == "complete":
        flag.setdefault("completedDateTime", _dttz(now_ms))
    if status == "notFlagged":
        flag = {"flagStatus": "notFlagged"}
    return flag


def _dttz(ms: int) -> dict[str, str]:
    return {"dateTime": iso(ms)[:-1] + ".0000000", "timeZone": "UTC"}


def _date_time_time_zone(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not isinstance(value.get("dateTime"), str):
        raise bad_request(f"{name} must be a dateTimeTimeZone object with a dateTime string.")
    zone = value.get("timeZone", "UTC")
    if not isinstance(zone, str):
        raise bad_request(f"{name}.timeZone must be a string.")
    try:
        datetime.fromisoformat(value["dateTime"][:26])
    except ValueError:
        raise bad_request(f"{name}.dateTime '{value['dateTime']}' is not a valid date and time.") from None
    return {"dateTime": value["dateTime"], "timeZone": zone}


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"Cannot convert the literal '{value}' to the expected type 'Edm.Boolean' ({name}).")
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string.")
    return value


def _enum(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise bad_request(f"Requested value '{value}' was not found for {name}; expected one of {', '.join(allowed)}.")
    return value


def _categories(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
        raise bad_request("categories must be an array of non-empty strings.")
    return tuple(dict.fromkeys(value))
