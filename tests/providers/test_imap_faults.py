"""ImapProvider under faults (a proxy in front of Dovecot): every fault is a retryable error, and retries converge.

Dropped connections mid-FETCH, ``* BYE`` and ``NO`` answers each surface
as ``ProviderUnavailable`` (never a crash, never a half-applied batch), the
provider reconnects by itself on the next call, and a sync loop that just
retries (what the engine does) ends equal to the mailbox.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from mailsync.actions.models import MessageAction
from mailsync.errors import ProviderUnavailable
from mailsync.models import FolderBatch, MessageBatch
from mailsync.providers.imap import ImapProvider
from mailsync.providers.imap_actions import ImapActions
from tests.fixtures.dovecot import DovecotServer
from tests.providers.contract import Mirror, assert_mirror_equals
from tests.providers.imap_faults import FaultProxy
from tests.providers.imap_harness import ImapHarness, make_harness


@pytest.fixture
def harness(dovecot: DovecotServer) -> ImapHarness:
    return make_harness(dovecot)


@pytest.fixture
def proxy(harness: ImapHarness) -> Iterator[FaultProxy]:
    proxy = FaultProxy(harness.user.host, harness.user.port, seed=11)
    harness.port = proxy.port
    yield proxy
    proxy.close()


@pytest.mark.parametrize("fault", ["bye_rate", "no_rate", "cut_rate"])
def test_each_fault_is_provider_unavailable_and_the_next_call_recovers(harness: ImapHarness, proxy: FaultProxy,
                                                                       fault: str) -> None:
    provider = harness.open(page_size=500)
    assert provider.folder_changes(None).upserts      # logged in and working
    setattr(proxy, fault, 1.0)
    with pytest.raises(ProviderUnavailable):
        provider.message_changes("INBOX", None)
    proxy.quiet()
    batch = provider.message_changes("INBOX", None)
    assert batch.upserts, "a new connection after the fault"
    assert getattr(proxy.counts, {"bye_rate": "byes", "no_rate": "nos", "cut_rate": "cuts"}[fault]) >= 1


def test_a_forced_fault_happens_once_at_the_next_command_it_applies_to(harness: ImapHarness,
                                                                       proxy: FaultProxy) -> None:
    provider = harness.open(page_size=500)
    assert provider.folder_changes(None).upserts
    proxy.force(cuts=1)                                # rates stay 0: only the forced cut
    provider.folder_changes(None)                      # LIST / STATUS are no FETCH: passed on
    with pytest.raises(ProviderUnavailable):
        provider.message_changes("INBOX", None)
    assert provider.message_changes("INBOX", None).upserts
    assert proxy.counts.cuts == 1 and proxy.counts.byes == proxy.counts.nos == 0


def test_a_cut_inside_a_literal_never_yields_a_partial_page(harness: ImapHarness, proxy: FaultProxy) -> None:
    provider = harness.open(page_size=500)
    full = provider.message_changes("INBOX", None)
    proxy.cut_rate = 1.0
    for _ in range(15):   # cuts at random byte offsets of the FETCH response
        with pytest.raises(ProviderUnavailable):
            provider.message_changes("INBOX", None)
    proxy.quiet()
    again = provider.message_changes("INBOX", None)
    assert [m.message_id for m in again.upserts] == [m.message_id for m in full.upserts]


def test_the_actions_open_a_new_connection_after_a_fault(harness: ImapHarness, proxy: FaultProxy) -> None:
    """ImapActions holds its connection like the provider (LazySession): a fault kills it, the next call
    opens another, with CONDSTORE enabled again (the read's MODSEQ says so)."""
    message_id = sorted(i for i, m in harness.messages().items() if m.folder_id == "INBOX" and not m.is_read)[0]
    actions = ImapActions(harness.connect, harness.account_id)
    try:
        proxy.force(byes=1)                                # at the SELECT, the first command after login
        (outcome,) = actions.apply([MessageAction(message_id, "INBOX", is_read=True)])
        assert not outcome.done and isinstance(outcome.error, ProviderUnavailable)
        (outcome,) = actions.apply([MessageAction(message_id, "INBOX", is_read=True)])
        assert outcome.done and harness.messages()[message_id].is_read
        proxy.force(byes=1)                                # at the EXAMINE
        with pytest.raises(ProviderUnavailable):
            actions.read_message("INBOX", message_id)
        content = actions.read_message("INBOX", message_id)
        assert content.message.is_read and content.message.version > 0
        assert proxy.counts.connections == 3 and proxy.counts.byes == 2
    finally:
        actions.close()


def _retrying(call, attempts: int = 200):  # type: ignore[no-untyped-def]
    for _ in range(attempts):
        try:
            return call()
        except ProviderUnavailable:
            time.sleep(0.01)
    raise AssertionError("never got through")


def test_a_sync_that_retries_converges_under_every_fault_at_once(harness: ImapHarness, proxy: FaultProxy) -> None:
    proxy.bye_rate, proxy.no_rate, proxy.cut_rate = 0.05, 0.1, 0.15
    provider = ImapProvider(harness.connect, harness.account_id, page_size=9)
    mirror = Mirror()

    def sync() -> None:
        while True:
            batch: FolderBatch = _retrying(lambda: provider.folder_changes(mirror.folder_cursor))
            mirror.apply_folders(batch)
            mirror.folder_cursor = batch.cursor
            if batch.complete:
                break
        for folder_id in list(mirror.folders):
            while True:
                cursor = mirror.cursors.get(folder_id)
                page: MessageBatch = _retrying(lambda f=folder_id, c=cursor: provider.message_changes(f, c))
                mirror.apply(folder_id, page)
                mirror.cursors[folder_id] = page.cursor
                if page.complete:
                    break

    sync()
    messages = sorted(harness.messages())
    harness.set_read(messages[0], True)
    harness.move(messages[1], "Archive")
    harness.delete(messages[2], permanently=True)
    harness.deliver("during faults")
    sync()
    proxy.quiet()
    assert_mirror_equals(mirror, harness)
    assert proxy.counts.byes + proxy.counts.nos + proxy.counts.cuts > 5, proxy.counts
