"""ImapProvider against a real Dovecot: the shared provider contract on every change-tracking path, plus IMAP's own.

The contract runs four times: QRESYNC (what Dovecot offers), CONDSTORE and
the full FLAGS scan forced on the same server (``paths``), and the full
scan again on a Dovecot that does not advertise CONDSTORE/QRESYNC at all.
IMAP-specific: which path a cursor really took, that "nothing changed"
costs one command on QRESYNC, UIDVALIDITY changes, folder roles, versions
(MODSEQ; time above the cursor's floor without CONDSTORE), first screen,
pages and resumption, and mapping of odd mail.
"""

from __future__ import annotations

import pytest

from mailsync.errors import CursorExpired, NotFound
from mailsync.providers.imap import ImapProvider, message_id_of
from mailsync.providers.imap_cursor import decode_folder_cursor, encode_folder_cursor
from tests.fixtures.dovecot import DovecotServer
from tests.providers.contract import Mirror, ProviderContract, assert_mirror_equals
from tests.providers.imap_harness import ImapHarness, make_harness


@pytest.fixture
def harness(dovecot: DovecotServer) -> ImapHarness:
    return make_harness(dovecot)


class TestImapContractQresync(ProviderContract):
    """The shared contract on Dovecot with everything it offers (QRESYNC)."""


class TestImapContractCondstore(ProviderContract):
    """CONDSTORE only: CHANGEDSINCE for changes, counts and UID blocks for expunges."""

    @pytest.fixture
    def harness(self, dovecot: DovecotServer) -> ImapHarness:
        return make_harness(dovecot, paths=("condstore",))


class TestImapContractScan(ProviderContract):
    """No change tracking used: full FLAGS scans compared block by block."""

    @pytest.fixture
    def harness(self, dovecot: DovecotServer) -> ImapHarness:
        return make_harness(dovecot, paths=("scan",))


class TestImapContractServerWithoutCondstore(ProviderContract):
    """A server that does not advertise CONDSTORE, QRESYNC, SORT, LIST-STATUS or SPECIAL-USE."""

    @pytest.fixture
    def harness(self, dovecot_plain: DovecotServer) -> ImapHarness:
        return make_harness(dovecot_plain)


# --- which path, and what it costs --------------------------------------------------------------

def _synced(harness: ImapHarness, provider: ImapProvider | None = None) -> tuple[ImapProvider, Mirror]:
    provider = provider or harness.open()
    mirror = Mirror()
    mirror.sync(provider)
    return provider, mirror


@pytest.mark.parametrize(("paths", "mode"), [(("qresync", "condstore", "scan"), "q"), (("condstore", "scan"), "c"),
                                             (("scan",), "f")])
def test_each_path_is_the_one_used(dovecot: DovecotServer, paths: tuple[str, ...], mode: str) -> None:
    harness = make_harness(dovecot, paths=paths)
    _provider, mirror = _synced(harness)
    modes = {decode_folder_cursor(c or "").mode for c in mirror.cursors.values()}
    assert modes == {mode}


def test_server_without_condstore_falls_back_to_scans(dovecot_plain: DovecotServer) -> None:
    harness = make_harness(dovecot_plain)
    provider, mirror = _synced(harness)
    assert {decode_folder_cursor(c or "").mode for c in mirror.cursors.values()} == {"f"}
    roles = {f.role for f in mirror.folders.values()}
    assert {"inbox", "sentitems", "drafts", "deleteditems", "junkemail", "archive"} <= roles, \
        "roles from the usual names when the server has no SPECIAL-USE"
    assert all(f.total_count is not None for f in mirror.folders.values()), "counts from STATUS without LIST-STATUS"
    provider.close()


class CountingSession:
    """Counts the IMAP commands a provider sends (wraps the real session's command methods)."""

    def __init__(self, harness: ImapHarness) -> None:
        self.commands: list[str] = []
        self._harness = harness

    def connect(self):  # type: ignore[no-untyped-def]
        session = self._harness.connect()
        for name in ("examine", "uid_search", "uid_fetch", "list_mailboxes", "uid_sort_arrival_desc"):
            original = getattr(session, name)

            def counted(*args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                self.commands.append(_name)
                return _original(*args, **kwargs)

            setattr(session, name, counted)
        return session


def test_nothing_changed_costs_one_command_per_folder_with_qresync(harness: ImapHarness) -> None:
    counting = CountingSession(harness)
    provider = ImapProvider(counting.connect, harness.account_id, page_size=50)
    _, mirror = _synced(harness, provider)
    counting.commands.clear()
    for folder_id, cursor in mirror.cursors.items():
        batch = provider.message_changes(folder_id, cursor)
        assert batch.complete and not batch.upserts and not batch.removals
    assert counting.commands == ["examine"] * len(mirror.cursors)


def test_condstore_nothing_changed_is_one_command_too(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot, paths=("condstore",))
    counting = CountingSession(harness)
    provider = ImapProvider(counting.connect, harness.account_id, page_size=50, paths=("condstore",))
    _, mirror = _synced(harness, provider)
    counting.commands.clear()
    for folder_id, cursor in mirror.cursors.items():
        assert not provider.message_changes(folder_id, cursor).upserts
    assert counting.commands == ["examine"] * len(mirror.cursors)


@pytest.mark.parametrize("paths", [("qresync",), ("condstore",), ("scan",)])
def test_an_expunge_among_many_removes_exactly_that_message(dovecot: DovecotServer, paths: tuple[str, ...]) -> None:
    harness = make_harness(dovecot, paths=paths)
    provider, mirror = _synced(harness)
    inbox = sorted((m for m in harness.messages().values() if m.folder_id == "INBOX"), key=lambda m: m.message_id)
    gone = inbox[len(inbox) // 2].message_id
    harness.delete(gone, permanently=True)
    harness.set_read(inbox[0].message_id, not inbox[0].is_read)
    batch = provider.message_changes("INBOX", mirror.cursors["INBOX"])
    assert batch.complete
    assert gone in batch.removals
    existing = {m.message_id for m in inbox} - {gone}
    assert not set(batch.removals) & existing, "a removal never names a message that is still there"
    upserted = [m.message_id for m in batch.upserts]
    if paths == ("scan",):
        # Without change tracking the block of UIDs around a change is read again (one block here).
        assert inbox[0].message_id in upserted and set(upserted) <= existing
    else:
        assert upserted == [inbox[0].message_id]


def test_uidvalidity_change_is_cursor_expired_for_that_folder_only(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    provider, mirror = _synced(harness)
    dovecot.set_uidvalidity(harness.user, "Archive", 4242)
    with pytest.raises(CursorExpired):
        provider.message_changes("Archive", mirror.cursors["Archive"])
    assert provider.message_changes("INBOX", mirror.cursors["INBOX"]).complete
    fresh = provider.message_changes("Archive", None)
    assert all(m.message_id.split(".")[1] == "4242" for m in fresh.upserts)


def test_a_qresync_answer_without_highestmodseq_is_cursor_expired(dovecot: DovecotServer) -> None:
    # Once a mailbox's index was reset by a UIDVALIDITY change, Dovecot answers EXAMINE without HIGHESTMODSEQ
    # on a connection that had the mailbox open shortly before, and that connection's first answer even gave
    # the *old* UIDVALIDITY: the UIDVALIDITY check passed and the round completed on a broken cursor (the
    # contract's broken-cursor test, "did not raise" under load). The first round here takes that first
    # answer, stale or not; the second names the UIDVALIDITY the server now gives, as the stale answer did
    # its own: the missing HIGHESTMODSEQ alone must end the incremental round.
    harness = make_harness(dovecot)
    provider, mirror = _synced(harness)
    dovecot.set_uidvalidity(harness.user, "INBOX", 4242)
    state = decode_folder_cursor(mirror.cursors["INBOX"] or "")
    assert (state.mode, state.stage) == ("q", "sync")
    with pytest.raises(CursorExpired):
        provider.message_changes("INBOX", mirror.cursors["INBOX"])
    with pytest.raises(CursorExpired, match="HIGHESTMODSEQ"):
        provider.message_changes("INBOX", encode_folder_cursor(state.with_(uidvalidity=4242)))


def test_a_cursor_from_another_path_is_cursor_expired(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    _, mirror = _synced(harness)
    scan_only = ImapProvider(harness.connect, harness.account_id, paths=("scan",))
    with pytest.raises(CursorExpired):
        scan_only.message_changes("INBOX", mirror.cursors["INBOX"])


def test_a_deleted_folder_is_not_found(harness: ImapHarness) -> None:
    provider = harness.open()
    with pytest.raises(NotFound):
        provider.message_changes("No such folder", None)


# --- the walk: newest first, pages, resumable -----------------------------------------------------

def test_the_walk_goes_newest_first_in_pages_and_resumes_from_any_cursor(harness: ImapHarness) -> None:
    provider = harness.open(page_size=6)
    first = provider.message_changes("INBOX", None)
    assert len(first.upserts) == 6 and not first.complete
    received = [m.received_at for m in first.upserts]
    assert received == sorted(received, reverse=True)
    inbox = sorted((m for m in harness.messages().values() if m.folder_id == "INBOX"),
                   key=lambda m: m.received_at, reverse=True)   # type: ignore[arg-type, return-value]
    assert [m.message_id for m in first.upserts] == [m.message_id for m in inbox[:6]]
    # A new provider (another worker) continues from the saved cursor: the walk has no gaps and no repeats
    # (the catch-up after it may repeat what the server says changed meanwhile).
    seen = [m.message_id for m in first.upserts]
    cursor = first.cursor
    while decode_folder_cursor(cursor).stage == "walk":
        batch = harness.open(page_size=6).message_changes("INBOX", cursor)
        assert not batch.complete
        seen += [m.message_id for m in batch.upserts]
        cursor = batch.cursor
    assert len(seen) == len(set(seen)) == len(inbox)
    assert harness.open(page_size=6).message_changes("INBOX", cursor).complete


def test_changes_during_the_walk_are_in_the_same_round(harness: ImapHarness) -> None:
    provider = harness.open(page_size=10)
    mirror = Mirror()
    batch = provider.message_changes("INBOX", None)
    mirror.apply("INBOX", batch)
    walked = [m.message_id for m in batch.upserts]
    harness.set_flagged(walked[0], True)              # already read by the walk
    harness.delete(walked[1], permanently=True)       # already read by the walk
    harness.deliver("arrived during the walk")        # above the walk's start
    cursor = batch.cursor
    while not batch.complete:
        batch = provider.message_changes("INBOX", cursor)
        mirror.apply("INBOX", batch)
        cursor = batch.cursor
    truth = {k: v for k, v in harness.messages().items() if v.folder_id == "INBOX"}
    assert set(mirror.messages) == set(truth)
    assert mirror.messages[walked[0]].flag_status == "flagged"
    assert any(m.subject == "arrived during the walk" for m in mirror.messages.values())


@pytest.mark.parametrize(("paths", "one_call"), [(("qresync",), True), (("condstore",), True), (("scan",), False)])
def test_a_folder_walked_in_one_call_ends_its_round_there(dovecot: DovecotServer, paths: tuple[str, ...],
                                                          one_call: bool) -> None:
    # One page, read right after the EXAMINE that took the round's baseline: nothing can have changed in
    # between that the FETCH did not see, so with MODSEQs the round is complete at once (no second visit
    # only to learn that), and whatever changes after it is the next incremental round's, from the baseline.
    harness = make_harness(dovecot, paths=paths)
    provider = harness.open(page_size=1000)
    batch = provider.message_changes("INBOX", None)
    truth = {k for k, v in harness.messages().items() if v.folder_id == "INBOX"}
    assert {m.message_id for m in batch.upserts} == truth
    assert batch.complete is one_call
    first, cursor = batch.upserts[0], batch.cursor
    if not one_call:   # without CONDSTORE the catch-up compares the folder's flags: a second call
        batch = provider.message_changes("INBOX", cursor)
        assert batch.complete and not batch.upserts and not batch.removals
        cursor = batch.cursor
    assert decode_folder_cursor(cursor).stage == "sync"
    flagged = first.message_id
    was = first.flag_status == "flagged"
    harness.set_flagged(flagged, not was)
    harness.deliver("after the round")
    after = provider.message_changes("INBOX", cursor)
    assert after.complete
    assert ({m.message_id: m.flag_status for m in after.upserts}[flagged] == "flagged") is not was
    assert any(m.subject == "after the round" for m in after.upserts)


def test_first_screen_is_newest_first_without_sort_too(dovecot_plain: DovecotServer) -> None:
    harness = make_harness(dovecot_plain)
    for n in range(3):
        harness.deliver(f"late {n}")
    newest = harness.open().newest_messages("INBOX", 4)
    assert [m.subject for m in newest[:3]] == ["late 2", "late 1", "late 0"]


# --- versions --------------------------------------------------------------------------------------

def test_versions_are_modseqs_and_grow_with_each_change(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    provider, mirror = _synced(harness)
    target = sorted(m for m in mirror.messages if mirror.messages[m].folder_id == "INBOX")[0]
    before = mirror.messages[target].version
    read = mirror.messages[target].is_read
    for _ in range(3):
        read = not read
        harness.set_read(target, read)
        mirror.sync(provider)
        after = mirror.messages[target].version
        assert after > before
        before = after
    first_screen = {m.message_id: m.version for m in provider.newest_messages("INBOX", 50)}
    assert all(first_screen[mid] == mirror.messages[mid].version for mid in first_screen), \
        "the first screen and the rounds agree on versions (equal versions rewrite, never regress)"


def test_versions_without_condstore_only_grow_along_the_cursor(dovecot: DovecotServer) -> None:
    now = [1_000.0]
    harness = make_harness(dovecot, paths=("scan",))
    provider = ImapProvider(harness.connect, harness.account_id, paths=("scan",), clock=lambda: now[0])
    mirror = Mirror()
    mirror.sync(provider)
    target = sorted(m for m in mirror.messages if mirror.messages[m].folder_id == "INBOX")[0]
    before = mirror.messages[target].version
    now[0] = 10.0     # the clock went back (another worker, skewed): versions still grow
    flagged = mirror.messages[target].flag_status == "flagged"
    harness.set_flagged(target, not flagged)
    mirror.sync(provider)
    assert mirror.messages[target].version > before
    assert (mirror.messages[target].flag_status == "flagged") is not flagged
    assert all(m.version == 0 for m in provider.newest_messages("INBOX", 5)), \
        "first-screen writes without CONDSTORE lose to any round's"


# --- folders ------------------------------------------------------------------------------------------

def test_folders_have_roles_parents_and_counts(harness: ImapHarness) -> None:
    batch = harness.open().folder_changes(None)
    folders = {f.folder_id: f for f in batch.upserts}
    assert {f.role for f in folders.values() if f.role} == {"inbox", "sentitems", "drafts", "deleteditems",
                                                            "junkemail", "archive"}
    assert folders["Projects/2026"].parent_id == "Projects" and folders["Projects/2026"].name == "2026"
    assert folders["Projects"].child_folder_count == 1
    truth = harness.messages().values()
    assert folders["INBOX"].total_count == sum(1 for m in truth if m.folder_id == "INBOX")
    assert folders["INBOX"].unread_count == sum(1 for m in truth if m.folder_id == "INBOX" and not m.is_read)


def test_new_mail_changes_the_folder_counts(harness: ImapHarness) -> None:
    provider = harness.open()
    first = provider.folder_changes(None)
    harness.deliver("counts")
    again = provider.folder_changes(first.cursor)
    assert [f.folder_id for f in again.upserts] == ["INBOX"] and not again.removals


def test_message_ids_are_unique_across_folders_with_equal_uidvalidity(dovecot: DovecotServer) -> None:
    harness = make_harness(dovecot)
    dovecot.set_uidvalidity(harness.user, "INBOX", 777)
    dovecot.set_uidvalidity(harness.user, "Archive", 777)
    _, mirror = _synced(harness)
    assert message_id_of("INBOX", 777, 1) in mirror.messages
    assert message_id_of("Archive", 777, 1) in mirror.messages
    assert_mirror_equals(mirror, harness)
