"""A new account's first pass (mailsync/sync/first_pass.py) against real services.

Small folders' first rounds run together in the folder list's invocation;
what must still hold: the store equals the mailbox, a mark made while the
pass holds the leases gets its round, and a pass that failed after its
write leaves the folders to rounds that drop what is gone (``remove_stale``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailsync.jobs import JobKind, new_job
from mailsync.models import AccountStatus
from mailsync.store.search_store import SearchStore
from mailsync.sync.engine import Delivery, Outcome
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.sync.world import QueuePump, SyncWorld, WorkerKilled, compare, make_world, world_settings


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxTestServer]) -> SandboxTestServer:
    # 40 messages over the mailbox's folders: every folder fits one 50-message page.
    return sandbox_factory(users=1, messages_per_user=40, delta_lag_s=0.0)


@pytest.fixture
def world(storage_env: dict[str, str], sandbox: SandboxTestServer, store: SearchStore) -> SyncWorld:
    return make_world(world_settings(storage_env, sandbox), sandbox, store, backoff_cap_s=2.0)


@pytest.fixture
def pump(world: SyncWorld) -> Iterator[QueuePump]:
    pump = QueuePump(world, workers=2, visibility_s=2)
    yield pump
    pump.stop()


class Counting:
    """A real service object, with the calls of the methods named counted (``calls``: name -> count)."""

    def __init__(self, inner: Any, *names: str) -> None:
        self.inner = inner
        self.names = frozenset(names)
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name in self.names:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                return found(*args, **kwargs)
            return counted
        return found


def run_linked(world: SyncWorld, delivery: str = "linked-1") -> Outcome:
    job = new_job(JobKind.SYNC_FOLDERS, world.account_id, reason="linked")
    return world.engine.handle(job, Delivery(delivery), world.events)


def test_a_new_account_of_small_folders_is_synced_by_its_folder_list_job_alone(world: SyncWorld) -> None:
    counting = Counting(world.store, "remove_stale", "upsert_messages", "set_folder_phase", "set_folder_phases",
                        "refresh")
    world.engine.store = counting   # type: ignore[assignment]
    accounts = Counting(world.engine.accounts, "get")
    world.engine.accounts = accounts   # type: ignore[assignment]
    sync_rows = Counting(world.engine.state, "load")
    world.engine.state = sync_rows   # type: ignore[assignment]
    counters = world.sandbox.admin("GET", "counters").json()
    deltas_before, requests_before = counters["deltaPages"], counters["requests"]
    assert run_linked(world) == Outcome.DONE
    rows = world.state.load(world.account_id)
    assert rows.folders and all(row.rounds == 1 and not row.lease_owner and not row.dirty
                                for row in rows.folders.values())
    assert world.account_status() == AccountStatus.SYNCED
    assert accounts.calls.get("get") == 1, "the job's read; becoming synced saves over it (ETag-checked)"
    # The account's rows: the job's read, after the folder list's round, after the first pass, at the end.
    # Neither the folder-list row the job created nor the folder list's lease, taken on the job's read,
    # is a reason to read them again (the folder list's round had no rows but the job's to begin from).
    assert sync_rows.calls.get("load") == 4, sync_rows.calls
    assert world.queue.sent == 0, "no job per folder, no continuation"
    # The folder list's roles batch (right after its first page) names the well-known folders its rows
    # were created from; the rows take the roles (they were once created again, refused, and left without).
    roles = {row.role for row in rows.folders.values()}
    assert {"inbox", "sentitems", "drafts", "deleteditems"} <= roles, roles
    counters = world.sandbox.admin("GET", "counters").json()
    assert counters["deltaPages"] - deltas_before == len(rows.folders)
    # Round trips: the folder list's page, its two roles batches (the Inbox's first), and the folders'
    # first pages in JSON batches of 20 (one request each was a round trip per folder and per role).
    assert counters["requests"] - requests_before == 3 + math.ceil(len(rows.folders) / 20), counters
    # One bulk request for every folder's messages, one phase update, one refresh; no folder was
    # ever written before, so no round's end looks for stale documents.
    assert counting.calls.get("upsert_messages") == 1 and counting.calls.get("set_folder_phases") == 1
    assert "remove_stale" not in counting.calls and "set_folder_phase" not in counting.calls
    assert counting.calls.get("refresh") == 1
    difference = compare(world)
    assert not difference, difference.summary()
    # The page heard about the Inbox first.
    inbox = next(row.folder_id for row in rows.folders.values() if row.role == "inbox")
    assert {m.folder_id for m in world.events.changes[0].upserted} == {inbox}
    assert any(p.phase == "synced" for p in world.events.progress)


def test_a_folder_asked_for_while_the_pass_holds_it_gets_its_round(world: SyncWorld, pump: QueuePump) -> None:
    # A poll's job for the Inbox arrives while the pass holds its lease: it marks the row dirty and
    # ends. The pass gives the lease back keeping the mark, so the change it was too early for
    # reaches the store in the round that follows (a poll has no look-again to cover for it).
    graph = world.sandbox.graph(world.user)
    inbox = graph.get("me/mailFolders/inbox?$select=id").json()["id"]
    message = graph.get("me/mailFolders/inbox/messages?$top=1&$select=id,isRead").json()["value"][0]
    asked: list[Outcome] = []

    def change_and_ask(folder_id: str, page: int) -> None:
        if not asked:
            assert graph.patch(f"me/messages/{message['id']}", json={"isRead": not message["isRead"]}).ok
            poll = new_job(JobKind.SYNC_FOLDER, world.account_id, inbox, reason="poll")
            asked.append(world.engine.handle(poll, Delivery("poll-1"), world.events))

    world.engine.before_write = change_and_ask
    assert run_linked(world) == Outcome.DONE
    world.engine.before_write = None
    assert asked == [Outcome.DONE]
    row = world.state.load(world.account_id).folders[inbox]
    assert row.rounds == 1 and row.dirty and not row.lease_owner, "the mark outlived the pass"
    pump.start()
    pump.drain()
    stored = world.store.get_message(world.account_id, message["id"])
    assert stored is not None and stored.is_read is not message["isRead"]
    difference = compare(world)
    assert not difference, difference.summary()


def test_a_pass_that_failed_after_its_write_leaves_its_folders_to_rounds_that_drop_what_is_gone(
        world: SyncWorld, pump: QueuePump) -> None:
    # The pass wrote every folder's messages, then its worker failed before the rows said so. A message
    # deleted meanwhile is in the store under the pass's epoch: the folders' next rounds must be full
    # rounds that drop it. (A row retaken as "never written" would skip that and keep it for good.)
    release_many = world.state.release_many
    failed: list[bool] = []

    def fail_once(ends: Any) -> list[str]:
        if not failed:
            failed.append(True)
            raise RuntimeError("the worker failed after the write")
        return release_many(ends)

    world.state.release_many = fail_once   # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        run_linked(world)
    graph = world.sandbox.graph(world.user)
    message = graph.get("me/mailFolders/inbox/messages?$top=1&$select=id").json()["value"][0]
    assert world.store.get_message(world.account_id, message["id"]) is not None, "written by the pass"
    assert graph.post(f"me/messages/{message['id']}/permanentDelete").status_code == 204
    rows = world.state.load(world.account_id)
    assert all(row.round_started and not row.lease_owner and row.rounds == 0 for row in rows.folders.values())
    assert run_linked(world, "linked-1") == Outcome.DONE     # the redelivery
    pump.start()
    pump.drain()
    assert world.store.get_message(world.account_id, message["id"]) is None
    assert world.account_status() == AccountStatus.SYNCED
    difference = compare(world)
    assert not difference, difference.summary()


def test_a_worker_dying_in_the_pass_is_taken_over_by_the_redelivery(world: SyncWorld, pump: QueuePump) -> None:
    # Killed after reading every page, before its write: nothing of it runs any more, not even its
    # cleanup. The redelivery of the same message frees the leases it held and the folders' rounds
    # (full ones: their rows say begun) bring the store to the mailbox.
    killed: list[bool] = []

    def die(folder_id: str, page: int) -> None:
        if page == 1 and not killed:
            killed.append(True)
            type(world.state).dead.value = True   # type: ignore[attr-defined]
            raise WorkerKilled()

    world.engine.before_write = die
    world.start_initial_sync()
    pump.start()
    pump.drain()
    assert killed and pump.stats.kills == 1
    rows = world.state.load(world.account_id)
    assert rows.slots_busy == 0 and all(row.rounds == 1 and not row.lease_owner for row in rows.folders.values())
    assert world.account_status() == AccountStatus.SYNCED
    difference = compare(world)
    assert not difference, difference.summary()
