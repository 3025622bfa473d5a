"""What a caller may ask of a message: the PATCH body, the DELETE parameter, the ids, checked.

Every refusal is an ``InputError`` with a code the API answers as a 400
naming the field, before anything is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailsync.errors import InputError
from mailsync.models import FlagStatus

MAX_ID_CHARS = 1024
CHANGE_FIELDS = frozenset({"is_read", "flag_status", "folder_id"})
# A flag status by its Graph name (the API's and the job's spelling).
FLAGS = {status.value: status for status in FlagStatus}


@dataclass(frozen=True)
class Change:
    """A validated PATCH body (at least one field set)."""

    is_read: bool | None = None
    flag_status: FlagStatus | None = None
    folder_id: str | None = None


def message_id_of(raw: Any) -> str:
    """A message id from the caller, checked (InputError naming it otherwise)."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_ID_CHARS or not raw.isprintable():
        raise InputError("message id must be a non-empty printable string", code="invalid_message_id")
    return raw


def parse_change(body: Any) -> Change:
    """``{"is_read": bool, "flag_status": "notFlagged"|"flagged"|"complete", "folder_id": str}`` (any, not none)."""
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", code="invalid_request")
    unknown = sorted(set(body) - CHANGE_FIELDS)
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} (accepted: {', '.join(sorted(CHANGE_FIELDS))})",
                         code="invalid_field")
    if not body:
        raise InputError("nothing to change: give is_read, flag_status or folder_id", code="empty_change")
    is_read = body.get("is_read")
    if is_read is not None and not isinstance(is_read, bool):
        raise InputError("is_read must be true or false", code="invalid_field")
    flag_raw = body.get("flag_status")
    flag = None
    if flag_raw is not None:
        flag = FLAGS.get(flag_raw) if isinstance(flag_raw, str) else None
        if flag is None:
            raise InputError("flag_status must be notFlagged, flagged or complete", code="invalid_field")
    folder_id = body.get("folder_id")
    if folder_id is not None and (not isinstance(folder_id, str) or not folder_id or len(folder_id) > MAX_ID_CHARS):
        raise InputError("folder_id must be a folder id", code="invalid_field")
    if is_read is None and flag is None and folder_id is None:
        raise InputError("nothing to change: give is_read, flag_status or folder_id", code="empty_change")
    return Change(is_read=is_read, flag_status=flag, folder_id=folder_id)


def parse_permanent(raw: str | None) -> bool:
    """``?permanent=`` of a DELETE: absent, empty or false; true."""
    if raw is None or raw == "" or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    raise InputError("permanent must be true or false", code="invalid_parameter")
