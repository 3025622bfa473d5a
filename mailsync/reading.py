"""What the web page reads: an account's folders and messages, and the public page config.

Every read is account-scoped twice: the bearer token must open the
account in the path (``AccountAccess``: 401 for a bad token, 404 for
another account's), and the store's read methods filter and route by
that account id. The bearer is checked before the query is parsed, so an
unauthenticated caller learns nothing from validation errors.

Message rows have exactly the shape of ``messagesChanged`` upserts
(``mailsync.realtime.signalr_messages.message_row``), so the page renders
a fetched page and a live patch with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mailsync.errors import InputError
from mailsync.linking.access import AccountAccess
from mailsync.models import FolderView, Mailbox, MessageQuery
from mailsync.ports import MessageStore
from mailsync.realtime.signalr_messages import message_row
from mailsync.settings import Settings

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_Q_CHARS = 500
MAX_ID_CHARS = 1024                 # Graph ids are ~150 characters; anything much longer is not an id
MESSAGE_PARAMS = frozenset({"folder_id", "unread", "flagged", "q", "limit", "cursor"})
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}

# Folders the page lists first, in this order (the rest follow by name).
ROLE_ORDER = ("inbox", "drafts", "sentitems", "archive", "junkemail", "deleteditems", "outbox")


def _invalid(name: str, message: str) -> InputError:
    return InputError(f"{name}: {message}", code="invalid_parameter")


def _boolean(params: Mapping[str, str], name: str) -> bool | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    value = _BOOLEANS.get(raw.strip().lower())
    if value is None:
        raise _invalid(name, "must be true or false")
    return value


def _text(params: Mapping[str, str], name: str, max_chars: int) -> str | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_chars:
        raise _invalid(name, f"longer than {max_chars} characters")
    if not raw.isprintable():
        raise _invalid(name, "contains control characters")
    return raw


def parse_message_query(params: Mapping[str, str]) -> MessageQuery:
    """``folder_id``, ``unread``, ``flagged``, ``q``, ``limit``, ``cursor`` → MessageQuery, or InputError (400)."""
    unknown = sorted(set(params) - MESSAGE_PARAMS)
    if unknown:
        raise InputError(f"unknown query parameter {unknown[0]!r} (accepted: {', '.join(sorted(MESSAGE_PARAMS))})",
                         code="invalid_parameter")
    raw_limit = params.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None and raw_limit != "":
        if not raw_limit.strip().isdigit():
            raise _invalid("limit", f"must be a whole number 1..{MAX_LIMIT}")
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise _invalid("limit", f"must be 1..{MAX_LIMIT}")
    q = _text(params, "q", MAX_Q_CHARS)
    return MessageQuery(
        folder_id=_text(params, "folder_id", MAX_ID_CHARS),
        unread=_boolean(params, "unread"),
        flagged=_boolean(params, "flagged"),
        q=(q.strip() or None) if q is not None else None,
        limit=limit,
        cursor=_text(params, "cursor", MAX_ID_CHARS),   # the store rejects one it did not make (invalid_cursor)
    )


def folder_json(view: FolderView) -> dict[str, Any]:
    folder = view.folder
    return {
        "folder_id": folder.folder_id,
        "name": folder.name,
        "parent_id": folder.parent_id,
        "role": folder.role,
        "total_count": folder.total_count,        # as the provider last reported it
        "unread_count": folder.unread_count,
        "stored_count": view.stored_count,         # what the store holds now
        "stored_unread": view.stored_unread,
        "phase": view.phase,
    }


def _folder_order(view: FolderView) -> tuple[int, str]:
    role = view.folder.role or ""
    rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
    return rank, view.folder.name.casefold()


def mailbox_json(mailbox: Mailbox | None) -> dict[str, Any] | None:
    if mailbox is None:
        return None
    return {
        "address": mailbox.address,
        "display_name": mailbox.display_name,
        "provider": mailbox.provider.value,
        "total_messages": mailbox.total_messages,
        "last_sync_at": mailbox.last_sync_at.isoformat().replace("+00:00", "Z") if mailbox.last_sync_at else None,
    }


class MailReader:
    """``GET /api/accounts/{id}/mailboxes`` and ``GET /api/accounts/{id}/messages``."""

    def __init__(self, access: AccountAccess, store: Callable[[], MessageStore]) -> None:
        self._access = access
        self._store = store     # built on first read: a store outage answers 503, not a failed start

    def mailboxes(self, account_id: str, bearer: str | None) -> dict[str, Any]:
        """The account's mailbox and its folders with counts, well-known folders first."""
        account = self._access.authenticate(account_id, bearer)
        store = self._store()
        views = sorted(store.list_folders(account.account_id), key=_folder_order)
        return {"account_id": account.account_id, "mailbox": mailbox_json(store.get_mailbox(account.account_id)),
                "folders": [folder_json(v) for v in views]}

    def messages(self, account_id: str, bearer: str | None, params: Mapping[str, str]) -> dict[str, Any]:
        """One page of the account's messages, newest first, and the cursor of the next page."""
        account = self._access.authenticate(account_id, bearer)
        query = parse_message_query(params)
        page = self._store().list_messages(account.account_id, query)
        return {"account_id": account.account_id, "messages": [message_row(m) for m in page.messages],
                "next_cursor": page.next_cursor}


def page_config(settings: Settings) -> dict[str, Any]:
    """Public facts the page shows (no secrets): sandbox mode, the sandbox's mailbox page, plaintext IMAP allowed."""
    sandbox = settings.graph_sandbox_url if settings.uses_graph_sandbox else None
    return {
        "sandbox": sandbox is not None,
        "sandbox_url": sandbox,
        "sandbox_mail_url": f"{sandbox}/sandbox/mail" if sandbox else None,
        "provider": "outlook",
        # The IMAP form offers "no encryption" only where linking would accept it (local Dovecot).
        "imap_allow_insecure": settings.imap_allow_insecure,
    }
