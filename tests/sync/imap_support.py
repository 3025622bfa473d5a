"""The IMAP truth and the store's copy, reduced to the same plain records (convergence and end-to-end tests)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any

from mailsync.models import MessageQuery
from mailsync.providers.imap import message_id_of
from mailsync.providers.imap_mapping import categories as keyword_categories
from mailsync.store.search_store import SearchStore
from tests.fixtures.dovecot import ImapUser
from tests.providers.imap_harness import decode_subject


def imap_view(user: ImapUser) -> tuple[dict[str, Any], dict[str, Any]]:
    client = user.connect()
    try:
        listed = client.list_folders()
        names = {name for flags, _d, name in listed if b"\\Noselect" not in flags}
        parents = {name: name.rsplit("/", 1)[0] if "/" in name else None for name in names}
        folders = {name: (name.rsplit("/", 1)[-1], parents[name] if parents[name] in names else None)
                   for name in names}
        messages: dict[str, Any] = {}
        for name in sorted(names):
            info = client.select_folder(name, readonly=True)
            uids = client.search("ALL")
            if not uids:
                continue
            for uid, item in client.fetch(uids, ["FLAGS", "INTERNALDATE", "ENVELOPE"]).items():
                envelope = item[b"ENVELOPE"]
                sender = envelope.from_[0] if envelope.from_ else None
                address = f"{sender.mailbox.decode()}@{(sender.host or b'').decode()}" if sender else ""
                flags = item[b"FLAGS"]
                messages[message_id_of(name, int(info[b"UIDVALIDITY"]), uid)] = (
                    name, decode_subject(envelope.subject), b"\\Seen" in flags, b"\\Flagged" in flags,
                    tuple(sorted(keyword_categories(tuple(flags)))), address,
                    item[b"INTERNALDATE"].astimezone(UTC).isoformat())
        return folders, messages
    finally:
        client.logout()


def store_view(store: SearchStore, account_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    store.refresh()
    folders = {v.folder.folder_id: (v.folder.name, v.folder.parent_id) for v in store.list_folders(account_id)}
    messages: dict[str, Any] = {}
    cursor: str | None = None
    while True:
        page = store.list_messages(account_id, MessageQuery(limit=500, cursor=cursor))
        for m in page.messages:
            messages[m.message_id] = (m.folder_id, m.subject, m.is_read, m.flag_status.value == "flagged",
                                      tuple(sorted(m.categories)), m.sender.address if m.sender else "",
                                      m.received_at.isoformat() if m.received_at else None)
        if page.next_cursor is None:
            return folders, messages
        cursor = page.next_cursor


@dataclass
class Difference:
    missing: list[str]
    extra: list[str]
    stale: list[Any]
    folders: list[Any]

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.stale or self.folders)

    def summary(self) -> str:
        return (f"missing={len(self.missing)} extra={len(self.extra)} stale={len(self.stale)} "
                f"folders={self.folders[:4]} first stale={self.stale[:2]}")


def compare_views(user: ImapUser, store: SearchStore, account_id: str) -> Difference:
    truth_folders, truth = imap_view(user)
    got_folders, got = store_view(store, account_id)
    folder_diff = sorted(set(truth_folders.items()) ^ set(got_folders.items()), key=str)
    return Difference(missing=sorted(set(truth) - set(got)), extra=sorted(set(got) - set(truth)),
                      stale=[(k, got[k], truth[k]) for k in sorted(truth) if k in got and got[k] != truth[k]],
                      folders=folder_diff)
