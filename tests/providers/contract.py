"""The provider contract: what every ``MailProvider`` must do, whatever its wire protocol.

A provider module passes it by subclassing :class:`ProviderContract` in its
test module and giving a ``harness`` fixture (a :class:`MailboxHarness` over
a real server: the Graph sandbox, Dovecot). The tests only use the port and
the harness, so the same suite holds the Graph and the IMAP provider to the
same rules:

* a complete round of the folder list and of each folder, applied the way
  the store applies them (:class:`Mirror`), equals the mailbox;
* rounds continue from the cursor: nothing when nothing changed, and every
  kind of change a person makes (read, flag, move, delete, new mail, folder
  create / rename / delete) when something did;
* versions only grow; cursors are opaque and a broken one is CursorExpired;
* small pages still add up to the whole mailbox; the first screen is the
  newest messages, newest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import pytest

from mailsync.errors import CursorExpired, ProviderUnavailable
from mailsync.models import FlagStatus, Folder, FolderBatch, Message, MessageBatch
from mailsync.ports import MailProvider


@dataclass(frozen=True)
class TruthFolder:
    folder_id: str
    name: str
    parent_id: str | None


@dataclass(frozen=True)
class TruthMessage:
    message_id: str
    folder_id: str
    subject: str
    is_read: bool
    flagged: bool
    sender: str
    received_at: datetime | None


class MailboxHarness(Protocol):
    """One real mailbox, reachable through the provider and changed like a person would."""

    account_id: str
    inbox_id: str

    def open(self, *, page_size: int = 50) -> MailProvider: ...
    def folders(self) -> dict[str, TruthFolder]: ...
    def messages(self) -> dict[str, TruthMessage]: ...
    def set_read(self, message_id: str, read: bool) -> None: ...
    def set_flagged(self, message_id: str, flagged: bool) -> None: ...
    def move(self, message_id: str, folder_id: str) -> None: ...
    def delete(self, message_id: str, *, permanently: bool = False) -> None:
        """Delete as the user's client does (Outlook: to Deleted Items), or for good."""
        ...
    def deliver(self, subject: str) -> None: ...
    def create_folder(self, name: str) -> str: ...
    def rename_folder(self, folder_id: str, name: str) -> None: ...
    def delete_folder(self, folder_id: str) -> None: ...
    def break_cursors(self) -> None:
        """Make every saved cursor invalid (Graph: expire delta tokens; IMAP: UIDVALIDITY change)."""
        ...


@dataclass
class Mirror:
    """The store's rules in memory: newer-or-equal versions win, removals only from their folder."""

    folders: dict[str, Folder] = field(default_factory=dict)
    messages: dict[str, Message] = field(default_factory=dict)
    folder_cursor: str | None = None
    cursors: dict[str, str | None] = field(default_factory=dict)
    batches: int = 0

    def apply_folders(self, batch: FolderBatch) -> None:
        for folder in batch.upserts:
            self.folders[folder.folder_id] = folder
        for folder_id in batch.removals:
            self.folders.pop(folder_id, None)
            self.cursors.pop(folder_id, None)
            for message_id in [m for m, msg in self.messages.items() if msg.folder_id == folder_id]:
                del self.messages[message_id]

    def apply(self, folder_id: str, batch: MessageBatch) -> None:
        self.batches += 1
        ids = [m.message_id for m in batch.upserts] + list(batch.removals)
        assert len(ids) == len(set(ids)), "an id appears at most once in a batch"
        for message in batch.upserts:
            assert message.folder_id == folder_id, "a folder's stream writes only its own folder"
            stored = self.messages.get(message.message_id)
            if stored is None or message.version >= stored.version:
                self.messages[message.message_id] = message
        for message_id in batch.removals:
            stored = self.messages.get(message_id)
            if stored is not None and stored.folder_id == folder_id:
                del self.messages[message_id]

    def sync(self, provider: MailProvider) -> None:
        """Run a round of the folder list, then of every folder, to completion."""
        while True:
            batch = provider.folder_changes(self.folder_cursor)
            self.apply_folders(batch)
            self.folder_cursor = batch.cursor
            if batch.complete:
                break
        for folder_id in list(self.folders):
            cursor = self.cursors.get(folder_id)
            while True:
                page = provider.message_changes(folder_id, cursor)
                self.apply(folder_id, page)
                cursor = page.cursor
                if page.complete:
                    break
            self.cursors[folder_id] = cursor


def truth_of(message: Message) -> TruthMessage:
    return TruthMessage(
        message_id=message.message_id, folder_id=message.folder_id, subject=message.subject,
        is_read=message.is_read, flagged=message.flag_status == FlagStatus.FLAGGED,
        sender=message.sender.address if message.sender else "", received_at=message.received_at)


def assert_mirror_equals(mirror: Mirror, harness: MailboxHarness) -> None:
    folders = {fid: TruthFolder(f.folder_id, f.name, f.parent_id) for fid, f in mirror.folders.items()}
    assert folders == harness.folders()
    got = {mid: truth_of(m) for mid, m in mirror.messages.items()}
    want = harness.messages()
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    stale = [mid for mid in want if got[mid] != want[mid]]
    assert not stale, [(got[m], want[m]) for m in stale[:3]]


def _some(harness: MailboxHarness, n: int, where: Callable[[TruthMessage], bool] = lambda m: True) -> list[str]:
    found = sorted(m.message_id for m in harness.messages().values() if where(m))
    assert len(found) >= n, "the test mailbox is too small for this test"
    return found[:n]


class ProviderContract:
    """Subclass and provide a ``harness`` fixture (a fresh mailbox per test)."""

    def test_complete_rounds_equal_the_mailbox(self, harness: MailboxHarness) -> None:
        mirror = Mirror()
        mirror.sync(harness.open())
        assert_mirror_equals(mirror, harness)
        assert any(f.role == "inbox" and f.folder_id == harness.inbox_id for f in mirror.folders.values())

    def test_nothing_changed_means_nothing_returned(self, harness: MailboxHarness) -> None:
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        before = mirror.batches
        for folder_id, cursor in mirror.cursors.items():
            batch = provider.message_changes(folder_id, cursor)
            assert batch.complete and not batch.upserts and not batch.removals
        assert mirror.batches == before
        again = provider.folder_changes(mirror.folder_cursor)
        assert again.complete and not again.upserts and not again.removals

    def test_folders_read_together_get_what_each_would_alone(self, harness: MailboxHarness) -> None:
        # The first pass and quiet sweeps ask for many folders' pages at once (Graph: JSON batches of
        # 20). Each answer is its own folder's page; a read that fails is that read's error alone.
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        moved = _some(harness, 1, lambda m: m.folder_id != harness.inbox_id)[0]
        harness.move(moved, harness.inbox_id)
        harness.set_read(_some(harness, 1, lambda m: m.folder_id == harness.inbox_id and not m.is_read)[0], True)
        reads: list[tuple[str, str | None]] = [(fid, mirror.cursors[fid]) for fid in sorted(mirror.folders)]
        reads.append((harness.inbox_id, "not a cursor"))
        reads.extend((fid, None) for fid in sorted(mirror.folders)[:2])     # first rounds, from no cursor
        pages = provider.message_changes_many(reads)
        assert len(pages) == len(reads)
        assert isinstance(pages[len(mirror.folders)], CursorExpired)
        for (folder_id, cursor), page in zip(reads, pages, strict=True):
            if cursor is None or cursor == "not a cursor":
                continue
            assert isinstance(page, MessageBatch) and page.complete
            mirror.apply(folder_id, page)
            mirror.cursors[folder_id] = page.cursor
        assert_mirror_equals(mirror, harness)
        for (folder_id, _), page in list(zip(reads, pages, strict=True))[-2:]:
            assert isinstance(page, MessageBatch) and all(m.folder_id == folder_id for m in page.upserts)
        # Nothing since: every folder's page from its new cursor is empty.
        again = provider.message_changes_many([(fid, mirror.cursors[fid]) for fid in sorted(mirror.folders)])
        assert all(isinstance(p, MessageBatch) and p.complete and not p.upserts and not p.removals for p in again)

    def test_every_kind_of_change_is_seen(self, harness: MailboxHarness) -> None:
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        inbox = harness.inbox_id
        unread, read = _some(harness, 1, lambda m: not m.is_read), _some(harness, 1, lambda m: m.is_read)
        harness.set_read(unread[0], True)
        harness.set_read(read[0], False)
        harness.set_flagged(_some(harness, 1, lambda m: not m.flagged)[0], True)
        others = [fid for fid in harness.folders() if fid != inbox]
        in_inbox = _some(harness, 3, lambda m: m.folder_id == inbox and m.message_id not in unread + read)
        harness.move(in_inbox[0], others[0])
        harness.delete(in_inbox[1])
        harness.delete(in_inbox[2], permanently=True)
        harness.deliver("contract: new mail")
        old_versions = {mid: m.version for mid, m in mirror.messages.items()}
        mirror.sync(provider)
        assert_mirror_equals(mirror, harness)
        assert mirror.messages[unread[0]].version > old_versions[unread[0]]
        assert any(m.subject == "contract: new mail" for m in mirror.messages.values())
        assert in_inbox[2] not in mirror.messages

    def test_folder_create_rename_delete(self, harness: MailboxHarness) -> None:
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        created = harness.create_folder("Contract folder")
        mirror.sync(provider)
        assert mirror.folders[created].name == "Contract folder"
        moved = _some(harness, 1, lambda m: m.folder_id == harness.inbox_id)[0]
        harness.move(moved, created)
        harness.rename_folder(created, "Renamed folder")
        mirror.sync(provider)
        assert_mirror_equals(mirror, harness)
        harness.delete_folder(created)
        mirror.sync(provider)
        assert_mirror_equals(mirror, harness)

    def test_moved_away_and_back_is_still_there(self, harness: MailboxHarness) -> None:
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        other = next(fid for fid in harness.folders() if fid != harness.inbox_id)
        for message_id in _some(harness, 2, lambda m: m.folder_id == harness.inbox_id):
            harness.move(message_id, other)
            harness.move(message_id, harness.inbox_id)
        mirror.sync(provider)
        assert_mirror_equals(mirror, harness)

    def test_small_pages_add_up(self, harness: MailboxHarness) -> None:
        provider = harness.open(page_size=7)
        mirror = Mirror()
        mirror.sync(provider)
        assert_mirror_equals(mirror, harness)
        assert mirror.batches > len(mirror.folders), "several pages per folder at this size"

    def test_an_old_cursor_still_resumes_when_cursors_never_expire(self, harness: MailboxHarness) -> None:
        # The engine reads pages ahead of the last saved cursor (and writes several at once) only as far
        # as the provider keeps cursors valid: a provider saying they never expire must resume from an
        # early page's cursor after issuing many newer ones.
        provider = harness.open(page_size=7)
        if provider.cursors_expire:
            pytest.skip("only a folder's newest few cursors stay valid (the engine's read-ahead window)")
        mirror = Mirror()
        first = provider.message_changes(harness.inbox_id, None)
        assert not first.complete, "several pages in the Inbox at this size"
        mirror.apply(harness.inbox_id, first)
        cursor = first.cursor
        while not (page := provider.message_changes(harness.inbox_id, cursor)).complete:
            cursor = page.cursor   # read on to the end, issuing newer cursors; nothing applied
        cursor = first.cursor
        while True:
            page = provider.message_changes(harness.inbox_id, cursor)
            mirror.apply(harness.inbox_id, page)
            cursor = page.cursor
            if page.complete:
                break
        want = {mid: m for mid, m in harness.messages().items() if m.folder_id == harness.inbox_id}
        assert {mid: truth_of(m) for mid, m in mirror.messages.items()} == want

    def test_first_screen_is_the_newest_messages(self, harness: MailboxHarness) -> None:
        newest = harness.open().newest_messages(harness.inbox_id, 5)
        inbox = [m for m in harness.messages().values() if m.folder_id == harness.inbox_id]
        inbox.sort(key=lambda m: (m.received_at is not None, m.received_at), reverse=True)
        assert [m.message_id for m in newest] == [m.message_id for m in inbox[:5]]
        assert all(m.folder_id == harness.inbox_id for m in newest)

    def test_cursors_are_opaque_and_checked(self, harness: MailboxHarness) -> None:
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        cursor = mirror.cursors[harness.inbox_id]
        assert cursor and not cursor.startswith(("http://", "https://"))
        with pytest.raises(CursorExpired):
            provider.message_changes(harness.inbox_id, "not a cursor")
        with pytest.raises(CursorExpired):
            provider.folder_changes("garbage" + (mirror.folder_cursor or ""))

    def test_broken_cursor_is_cursor_expired_and_a_fresh_round_recovers(self, harness: MailboxHarness) -> None:
        provider = harness.open()
        mirror = Mirror()
        mirror.sync(provider)
        harness.break_cursors()
        cursor = mirror.cursors[harness.inbox_id]
        with pytest.raises(CursorExpired):
            try:
                provider.message_changes(harness.inbox_id, cursor)
            except ProviderUnavailable:
                # Dovecot may drop a connection that had the folder open when its UIDVALIDITY changed
                # under it ("* BYE IMAP session state is inconsistent, please relogin", at the first
                # FETCH after an EXAMINE that still gave the old UIDVALIDITY: the full-scan path, which
                # has no HIGHESTMODSEQ to tell; docs/imap.md). The engine retries that, and the retry, on
                # a new connection, must see the broken cursor. A round completing on it is the bug.
                provider.message_changes(harness.inbox_id, cursor)
        fresh = Mirror()
        fresh.sync(provider)
        assert_mirror_equals(fresh, harness)
