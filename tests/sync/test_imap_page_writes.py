"""A folder's page writes in flight on IMAP: a write that fails while the next one succeeds loses nothing.

The engine writes up to two pages of a folder at once (mailsync/sync/page_writes.py).
Here the store fails one page's write only after the write started behind it
was acknowledged — the case the pipeline adds — and every cursor the engine
saves is checked against the writes acknowledged at that moment: a saved
cursor must never stand past a page whose write is not acknowledged. Then
the round goes on (the failure waited for in place) or resumes from the
saved cursor in a later invocation (a longer wait), and the store ends with
every message of the folder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from mailsync.errors import StoreUnavailable
from mailsync.jobs import JobKind, new_job
from mailsync.models import Account, BulkResult, Message, MessageBatch, MessageQuery, SyncPhase
from mailsync.providers.imap import ImapProviderFactory
from mailsync.store.search_store import SearchStore
from mailsync.sync.invocation import Delivery
from mailsync.sync.page_writes import page_ids
from tests.fixtures.dovecot import DovecotServer
from tests.sync.imap_support import imap_view
from tests.sync.test_imap_convergence import ImapWorld, Plan, Scale, make_imap_world

QUIET = Plan(seed=11, bye_rate=0.0, no_rate=0.0, cut_rate=0.0, raise_rate=0.0, kill_rate=0.0, duplicate_rate=0.0,
             uidvalidity_every=0)
# 120 Inbox messages in pages of 20: six pages and the walk's catch-up.
SMALL = Scale(messages=240, examples=1, min_mutations=0, page_size=20)


class FailingWhileTheNextLands:
    """The real store; its ``fail_call``-th upsert fails, but only once the upsert after it was acknowledged.

    Records the ids of every acknowledged upsert (``acked``).
    """

    def __init__(self, inner: SearchStore, *, fail_call: int, error: Exception) -> None:
        self._inner = inner
        self._fail_call = fail_call
        self._error = error
        self._lock = threading.Lock()
        self._calls = 0
        self._next_landed = threading.Event()
        self.acked: set[str] = set()
        self.failed: set[str] = set()
        self.overlapped = False      # the next write was acknowledged while the failing one was in flight

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def upsert_messages(self, messages: Sequence[Message], *, epoch: int = 0) -> BulkResult:
        with self._lock:
            self._calls += 1
            call = self._calls
        if call == self._fail_call:
            self.overlapped = self._next_landed.wait(10)
            self.failed.update(m.message_id for m in messages)
            raise self._error
        result = self._inner.upsert_messages(messages, epoch=epoch)
        with self._lock:
            self.acked.update(m.message_id for m in messages)
        if call == self._fail_call + 1:
            self._next_landed.set()
        return result


class CursorChains:
    """The provider's Inbox pages by cursor: every message id read up to (and with) the page that issued it."""

    def __init__(self, inner: ImapProviderFactory) -> None:
        self.inner = inner
        self.chain: dict[str, frozenset[str]] = {}

    def open(self, account: Account) -> Any:
        provider = self.inner.open(account)
        original = provider.message_changes

        def message_changes(folder_id: str, cursor: str | None) -> MessageBatch:
            batch = original(folder_id, cursor)
            if folder_id == "INBOX":
                self.chain[batch.cursor] = self.chain.get(cursor or "", frozenset()) | page_ids([batch])
            return batch

        provider.message_changes = message_changes  # type: ignore[method-assign]
        return provider


def _watch_saved_cursors(world: ImapWorld, store: FailingWhileTheNextLands, chains: CursorChains,
                         monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Inbox cursor saved (save or finish) past a page not acknowledged then: the violations."""
    violations: list[str] = []

    def check(lease: Any, changes: dict[str, Any]) -> None:
        cursor = changes.get("cursor")
        if lease.state.folder_id != "INBOX" or not cursor:
            return
        unacked = chains.chain[cursor] - store.acked
        if unacked:
            violations.append(f"cursor saved with {len(unacked)} message(s) of its pages not written")

    def watched(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(lease: Any, **changes: Any) -> Any:
            check(lease, changes)
            return method(lease, **changes)
        return call

    for name in ("save", "finish"):
        monkeypatch.setattr(world.state, name, watched(getattr(world.state, name)))
    return violations


def _inbox_row(world: ImapWorld) -> Any:
    return world.state.load(world.account_id).folders["INBOX"]


def _inbox_in_store(world: ImapWorld) -> set[str]:
    world.store.refresh()
    page = world.store.list_messages(world.account_id, MessageQuery(folder_id="INBOX", limit=500))
    return {m.message_id for m in page.messages}


def _inbox_at_dovecot(world: ImapWorld) -> set[str]:
    return {mid for mid, record in imap_view(world.user)[1].items() if record[0] == "INBOX"}


def _world(storage_env: dict[str, str], dovecot: DovecotServer, store: SearchStore, error: Exception,
           monkeypatch: pytest.MonkeyPatch) -> tuple[ImapWorld, FailingWhileTheNextLands, list[str], CursorChains]:
    world = make_imap_world(storage_env, dovecot, store, plan=QUIET, scale=SMALL)
    # The folder list first (its first screen writes the Inbox's newest messages straight to the store).
    world.engine.handle(new_job(JobKind.SYNC_FOLDERS, world.account_id, reason="linked"),
                        Delivery("list", 1), world.events)
    failing = FailingWhileTheNextLands(store, fail_call=2, error=error)
    chains = CursorChains(world.factory)
    world.engine.store = failing
    world.engine.providers = chains
    return world, failing, _watch_saved_cursors(world, failing, chains, monkeypatch), chains


@pytest.mark.timeout(300)
def test_a_write_failing_behind_an_acknowledged_one_is_written_again_in_place(
        storage_env: dict[str, str], dovecot: DovecotServer, make_store: Callable[..., SearchStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    world, failing, violations, _ = _world(storage_env, dovecot, make_store(),
                                           StoreUnavailable("bulk refused for now", retry_after_s=0.05), monkeypatch)
    world.engine.handle(new_job(JobKind.SYNC_FOLDER, world.account_id, "INBOX", reason="start"),
                        Delivery("inbox", 1), world.events)

    assert failing.overlapped, "the next page's write was acknowledged while the failing one was in flight"
    assert failing.failed and failing.failed <= failing.acked, "the failed page was written again"
    assert violations == []
    row = _inbox_row(world)
    assert row.phase == SyncPhase.INCREMENTAL and row.failures == 0, "the round went on after the short wait"
    assert _inbox_in_store(world) == _inbox_at_dovecot(world)


@pytest.mark.timeout(300)
def test_a_write_failing_behind_an_acknowledged_one_leaves_the_cursor_before_it_and_the_round_resumes(
        storage_env: dict[str, str], dovecot: DovecotServer, make_store: Callable[..., SearchStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    world, failing, violations, chains = _world(
        storage_env, dovecot, make_store(), StoreUnavailable("store overloaded", retry_after_s=30.0), monkeypatch)
    world.engine.handle(new_job(JobKind.SYNC_FOLDER, world.account_id, "INBOX", reason="start"),
                        Delivery("inbox", 1), world.events)

    assert failing.overlapped
    row = _inbox_row(world)
    assert row.phase == SyncPhase.INITIAL and row.failures == 1 and not row.lease_owner, "deferred, lease given back"
    saved = chains.chain.get(row.cursor, frozenset())
    assert not saved & failing.failed, "the saved cursor stands before the failed page"
    assert saved <= failing.acked and violations == []
    # The page after the failed one was written, yet its cursor was never saved: the next round reads it again.
    assert failing.acked - saved - failing.failed

    # The wait is over: the continuation resumes from the saved cursor and nothing is lost.
    world.state.mark(world.account_id, "INBOX", dirty=False, not_before=0.0)
    world.engine.handle(new_job(JobKind.SYNC_FOLDER, world.account_id, "INBOX", reason="start"),
                        Delivery("inbox-again", 1), world.events)
    assert _inbox_row(world).phase == SyncPhase.INCREMENTAL
    assert violations == []
    assert _inbox_in_store(world) == _inbox_at_dovecot(world)
