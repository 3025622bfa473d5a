"""A user's action meets the sync engine: what the page is told when a delta page read before it is written.

The store refuses that page's row (the action's optimistic row is newer,
mailsync/actions/versions.py); the live channel must not send it either,
or every open page shows the action undone while the store still has it
(found by reading the engine against the convergence property's user actor:
the engine published a page's rows whatever the store did with them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mailsync.actions.service import MessageActionService
from mailsync.jobs import JobKind, new_job
from mailsync.linking.access import AccountAccess
from mailsync.models import MessageQuery
from mailsync.providers.graph_actions import GraphActions
from mailsync.providers.graph_client import GraphClient
from mailsync.settings import Settings
from mailsync.store.action_ledger import SearchActionLedger
from mailsync.store.search_store import SearchStore
from mailsync.sync.engine import Delivery
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.sync.world import QueuePump, SyncWorld, compare, make_world


class SandboxActions:
    """``MessageActionsFactory`` on the world's sandbox user (the engine's token source)."""

    def __init__(self, world: SyncWorld) -> None:
        self._world = world

    def open_actions(self, account: Any) -> GraphActions:
        world = self._world
        return GraphActions(GraphClient(lambda force: world.tokens.access_token(account.account_id,
                                                                                force_refresh=force),
                                        base_url=f"{world.sandbox.base_url}/v1.0"), account.account_id)


@pytest.fixture
def world(storage_env: dict[str, str], sandbox_factory: Callable[..., SandboxTestServer],
          store: SearchStore) -> SyncWorld:
    sandbox = sandbox_factory(users=2, messages_per_user=120, delta_lag_s=0.0)
    settings = Settings.from_env({**storage_env, "GRAPH_SANDBOX_URL": sandbox.base_url, "SYNC_TIME_BUDGET_S": "10",
                                  "GRAPH_PAGE_SIZE": "50", "FOLDER_LEASE_S": "30"})
    world = make_world(settings, sandbox, store, backoff_cap_s=2.0)
    world.actions = MessageActionService(AccountAccess(world.tables.accounts), world.tables.accounts,
                                         lambda: world.store, SandboxActions(world), lambda: world.queue,
                                         ledger=lambda: SearchActionLedger.of(world.store), epochs=world.state.epochs,
                                         slots=lambda: world.state, max_slots=settings.graph_max_concurrency)
    return world


def _drain(world: SyncWorld) -> None:
    pump = QueuePump(world, workers=2, visibility_s=2)
    pump.start()
    try:
        pump.drain()
    finally:
        pump.stop()


def test_a_delta_page_read_before_an_action_is_not_published_after_it(world: SyncWorld) -> None:
    world.start_initial_sync()
    _drain(world)
    assert not compare(world)
    inbox = next(r.folder_id for r in world.state.load(world.account_id).folders.values() if r.role == "inbox")
    assert inbox is not None
    row = next(m for m in world.store.list_messages(world.account_id, MessageQuery(folder_id=inbox, unread=True,
                                                                                    limit=5)).messages)
    # The person flags it in Outlook: the Inbox's next delta page lists it, still unread.
    flagged = world.sandbox.graph(world.user).request("PATCH", f"me/messages/{row.message_id}",
                                                      json={"flag": {"flagStatus": "flagged"}})
    assert flagged.status_code == 200, flagged.text
    published_before: list[int] = []

    def mark_read_between_read_and_write(folder_id: str, page: int) -> None:
        # The engine has read the page; the user marks the message read before it is written.
        if folder_id == inbox and not published_before:
            published_before.append(len(world.events.changes))
            world.actions.update(world.account_id, world.token, row.message_id, {"is_read": True})

    world.engine.before_write = mark_read_between_read_and_write
    world.engine.handle(new_job(JobKind.SYNC_FOLDER, world.account_id, inbox, reason="poll"),
                        Delivery("round-1", 1), world.events)
    world.engine.before_write = None
    assert published_before, "the Inbox round wrote a page"
    world.store.refresh()
    stored = world.store.get_message(world.account_id, row.message_id)
    assert stored is not None and stored.is_read is True          # the store refused the older page
    shown = [m for event in world.events.changes[published_before[0]:] for m in event.upserted
             if m.message_id == row.message_id]
    assert all(m.is_read for m in shown), "the page was told the message is unread again"

    # The action reaches Outlook, the next round confirms it: the store equals the mailbox.
    _drain(world)
    assert world.sandbox.snapshot(world.user)["messages"] and next(
        m for m in world.sandbox.snapshot(world.user)["messages"] if m["id"] == row.message_id)["isRead"] is True
    world.poll()
    _drain(world)
    difference = compare(world)
    assert not difference, difference.summary()


def test_a_bulk_job_holds_the_free_request_slots_while_its_batches_run(world: SyncWorld) -> None:
    """The sync rounds its own changes trigger would take the mailbox's slots its batch items need (each
    item of a $batch is one of the mailbox's 4 concurrent requests): the job holds the free ones, a round
    then finds none (BUSY, it looks again later), and they are given back when the job ends."""
    world.start_initial_sync()
    _drain(world)
    running = world.state.acquire_slot(world.account_id, "a-sync-round#1", 4)   # a round holds one already
    assert running is not None
    seen: list[tuple[int, object]] = []
    worker = world.actions._worker          # the ACTION job side opens the provider (mailsync.actions.worker)
    factory = worker._actions

    class Watching:
        def open_actions(self, account: Any) -> Any:
            provider = factory.open_actions(account)
            apply = provider.apply

            def watched(actions: Any, **options: Any) -> Any:
                held = [r for r in world.state.load(world.account_id).slots
                        if r.owner.startswith("action-") and r.until > 0]
                seen.append((len(held), world.state.acquire_slot(world.account_id, "another-round#1", 4),
                             options.get("parallel")))
                return apply(actions, **options)

            provider.apply = watched
            return provider

    worker._actions = Watching()
    ids = [m.message_id for m in world.store.list_messages(world.account_id, MessageQuery(unread=True,
                                                                                           limit=12)).messages]
    world.actions.bulk(world.account_id, world.token, {"message_ids": ids, "action": {"is_read": True}})
    _drain(world)
    # The 3 free slots, none left for a round; the provider told it holds three (three chained batches at once).
    assert seen and seen[0] == (3, None, 3), seen
    truth = {m["id"]: m for m in world.sandbox.snapshot(world.user)["messages"]}
    assert all(truth[i]["isRead"] for i in ids)
    after = world.state.load(world.account_id).slots
    assert not [r for r in after if r.owner.startswith("action-")], "given back"
    assert world.state.acquire_slot(world.account_id, "another-round#2", 4) is not None
    world.state.release_slot(running)
