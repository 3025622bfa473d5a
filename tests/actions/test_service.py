"""MessageActionService end to end below HTTP: Azurite accounts, the search store, the Graph sandbox and Dovecot.

The queue is the one edge replaced: jobs the service enqueues are kept in a
list and run by the test the way the sync worker runs them (the job's JSON
round trip included), so a test can put a delta page, an Outlook change or
a failure exactly between the optimistic write and the provider call.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest

from mailsync.actions.service import MessageActionService
from mailsync.errors import AuthenticationError, DependencyUnavailable, InputError, NotFound, ProviderUnavailable
from mailsync.jobs import JobOutbox, WakingJobQueue, decode_job, encode_job
from mailsync.linking.access import AccountAccess, issue_access_token
from mailsync.models import Account, AccountStatus, FlagStatus, Job, MessagesChanged, Provider
from mailsync.providers.graph_actions import GraphActions
from mailsync.providers.graph_client import GraphClient
from mailsync.providers.imap_actions import ImapActions
from mailsync.realtime.signalr_messages import TARGET_ACTIONS_FAILED, TARGET_CHANGES, BufferingPublisher
from mailsync.settings import Settings
from mailsync.store.action_ledger import SearchActionLedger
from mailsync.store.search_store import SearchStore
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.linking.tables import linking_tables
from tests.providers.contract import Mirror
from tests.providers.imap_harness import ImapHarness, make_harness
from tests.providers.test_graph_provider import GraphHarness


@dataclass
class RecordingQueue:
    jobs: list[Job] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    down: bool = False          # enqueue raises what AzureJobQueue raises when Azure Queues fails

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        if self.down:
            raise DependencyUnavailable("cannot enqueue a job on queue sync: ServiceRequestError")
        self.jobs.append(decode_job(encode_job(job)))   # what the worker would read back
        self.delays.append(delay_s)


class Factory:
    """Opens the real provider; ``before_apply`` (when set) runs first inside each ``apply``, so a
    test can put something between a job's checks and its write reaching the provider; ``before_read``
    the same inside each ``read_message`` (it may raise what a dropped connection raises), ``after_read``
    once the provider answered it."""

    def __init__(self, make) -> None:  # type: ignore[no-untyped-def]
        self._make = make
        self.before_apply = None
        self.before_read = None
        self.after_read = None

    def open_actions(self, account: Account):  # type: ignore[no-untyped-def]
        provider = self._make()
        before_read, after_read = self.before_read, self.after_read
        if before_read is not None or after_read is not None:
            read = provider.read_message

            def hooked_read(folder_id, message_id):  # type: ignore[no-untyped-def]
                if before_read is not None:
                    before_read(folder_id, message_id)
                answer = read(folder_id, message_id)
                if after_read is not None:
                    after_read(folder_id, message_id)
                return answer

            provider.read_message = hooked_read
        hook = self.before_apply
        if hook is not None:
            apply = provider.apply

            def hooked(actions, **options):  # type: ignore[no-untyped-def]
                hook(actions)
                return apply(actions, **options)

            provider.apply = hooked
        return provider


@dataclass
class World:
    service: MessageActionService
    store: SearchStore
    queue: RecordingQueue
    account_id: str
    token: str
    harness: GraphHarness | ImapHarness
    mirror: Mirror
    factory: Factory
    epochs: dict[str, int]      # the folders' sync epochs the service reads (the engine's rows, in the product)
    ledger: SearchActionLedger
    # Runs once, right after the service's next read of the epochs has taken its answer: what happens
    # between that read and the write it is for (a resync beginning).
    after_epochs_read: Callable[[], None] | None = None

    def read_epochs(self) -> dict[str, int]:
        answer = dict(self.epochs)
        hook, self.after_epochs_read = self.after_epochs_read, None
        if hook is not None:
            hook()
        return answer

    def sync(self) -> None:
        """A complete round of every folder into the store (what the engine writes).

        Outlook's delta shows a change about a second after it was made (the sandbox's ``delta_lag_s``):
        a round right after a change would not see it yet.
        """
        server = getattr(self.harness, "server", None)
        lag = getattr(getattr(getattr(server, "state", None), "config", None), "delta_lag_s", 0.0)
        time.sleep(lag)
        self.mirror = Mirror()
        self.mirror.sync(self.harness.open())
        self.store.upsert_folders(list(self.mirror.folders.values()))
        self.store.upsert_messages(list(self.mirror.messages.values()))
        self.store.refresh()

    def work(self) -> BufferingPublisher:
        events = BufferingPublisher()
        jobs, self.queue.jobs = self.queue.jobs, []
        for job in jobs:
            self.service.run_job(job, events)
        self.store.refresh()
        return events

    def row(self, message_id: str):  # type: ignore[no-untyped-def]
        return self.store.get_message(self.account_id, message_id)


def _world(storage_settings: Settings, store: SearchStore, harness, provider: Provider,  # type: ignore[no-untyped-def]
           make_actions) -> World:
    tables = linking_tables(storage_settings)
    account_id = uuid.uuid4().hex
    token, token_hash = issue_access_token(account_id)
    now = datetime.now(UTC).replace(microsecond=0)
    tables.accounts.save(Account(account_id=account_id, provider=provider, status=AccountStatus.SYNCED,
                                 access_token_hash=token_hash, created_at=now, updated_at=now))
    harness.account_id = account_id
    queue = RecordingQueue()
    ledger = SearchActionLedger.of(store)
    factory = Factory(make_actions)
    worlds: list[World] = []
    service = MessageActionService(AccountAccess(tables.accounts), tables.accounts, lambda: store,
                                   factory, lambda: queue, ledger=lambda: ledger,
                                   epochs=lambda _account, _folders: worlds[0].read_epochs())
    world = World(service, store, queue, account_id, token, harness, Mirror(), factory, {}, ledger)
    worlds.append(world)
    world.sync()
    return world


@pytest.fixture
def outlook(storage_settings: Settings, store: SearchStore,
            sandbox_factory) -> Iterator[World]:  # type: ignore[no-untyped-def]
    server: SandboxTestServer = sandbox_factory(users=2, messages_per_user=60)
    harness = GraphHarness(server, server.users[0], server.users[1])

    def make() -> GraphActions:
        token = server.user_token(harness.user.mail)
        return GraphActions(GraphClient(lambda _f: token, base_url=f"{server.base_url}/v1.0"), harness.account_id,
                            sleep=lambda s: None)

    yield _world(storage_settings, store, harness, Provider.OUTLOOK, make)


@pytest.fixture
def imap(storage_settings: Settings, store: SearchStore, dovecot: DovecotServer) -> Iterator[World]:
    harness = make_harness(dovecot, folders={"INBOX": 30, "Archive": 5, "Trash": 0})
    yield _world(storage_settings, store, harness, Provider.IMAP,
                 lambda: ImapActions(harness.connect, harness.account_id))


def _inbox(world: World, n: int = 1, **where: bool) -> list[str]:
    found = sorted(m.message_id for m in world.harness.messages().values()
                   if m.folder_id == world.harness.inbox_id and all(getattr(m, k) == v for k, v in where.items()))
    return found[:n]


def _moved_into_a_folder_then_deleted(world: World) -> tuple[str, str]:
    """An Inbox message the user moves (not yet carried out) into a folder another client then deletes."""
    (message_id,) = _inbox(world)
    doomed = world.harness.create_folder("Doomed")
    world.sync()
    world.service.update(world.account_id, world.token, message_id, {"folder_id": doomed})
    world.harness.delete_folder(doomed)
    return message_id, doomed


# --- the optimistic row, then the provider ----------------------------------------------------------------

@pytest.mark.parametrize("world_name", ["outlook", "imap"])
def test_mark_read_is_in_the_store_at_once_and_at_the_provider_after_the_job(world_name: str,
                                                                           request: pytest.FixtureRequest) -> None:
    world: World = request.getfixturevalue(world_name)
    (message_id,) = _inbox(world, is_read=False)
    answer = world.service.update(world.account_id, world.token, message_id, {"is_read": True,
                                                                              "flag_status": "flagged"})
    assert answer["message"]["is_read"] is True and answer["pending"] is True
    world.store.refresh()
    assert world.row(message_id).is_read is True                       # optimistic, before the provider
    assert world.harness.messages()[message_id].is_read is False
    events = world.work()
    truth = world.harness.messages()[message_id]
    assert truth.is_read is True and truth.flagged is True
    changes = [m for m in events.messages() if m["target"] == TARGET_CHANGES]
    assert changes and changes[0]["arguments"][0]["upserted"][0]["is_read"] is True


def test_the_optimistic_rows_are_published_at_once_before_the_provider_has_them(outlook: World) -> None:
    """The user's other pages hear of an action from the API call itself, not from the job (issue 17)."""
    world = outlook
    first, second, third = _inbox(world, 3, is_read=False)
    archive = next(f.folder_id for f in world.mirror.folders.values() if f.role == "archive")
    trash = next(f.folder_id for f in world.mirror.folders.values() if f.role == "deleteditems")
    inbox = world.harness.inbox_id

    def published(act) -> dict:  # type: ignore[no-untyped-def]
        events = BufferingPublisher()
        act(events)
        (changes,) = [m for m in events.messages() if m["target"] == TARGET_CHANGES]
        assert changes["userId"] == world.account_id
        return changes["arguments"][0]  # type: ignore[no-any-return]

    read = published(lambda e: world.service.update(world.account_id, world.token, first, {"is_read": True}, e))
    assert [(r["message_id"], r["is_read"], r["folder_id"]) for r in read["upserted"]] == [(first, True, inbox)]
    assert read["removed"] == []
    moved = published(lambda e: world.service.update(world.account_id, world.token, second,
                                                     {"folder_id": archive}, e))
    assert [(r["message_id"], r["folder_id"]) for r in moved["upserted"]] == [(second, archive)]
    assert moved["removed"] == [{"folder_id": inbox, "message_id": second}]
    trashed = published(lambda e: world.service.delete(world.account_id, world.token, third, None, e))
    assert [(r["message_id"], r["folder_id"]) for r in trashed["upserted"]] == [(third, trash)]
    gone = published(lambda e: world.service.delete(world.account_id, world.token, first, "true", e))
    assert gone["upserted"] == [] and gone["removed"] == [{"folder_id": inbox, "message_id": first}]
    ids = sorted(i for i, m in world.harness.messages().items()
                 if not m.flagged and i not in (first, second, third))[:12]
    flagged = published(lambda e: world.service.bulk(world.account_id, world.token,
                                                     {"message_ids": ids, "action": {"flag_status": "flagged"}}, e))
    assert sorted(r["message_id"] for r in flagged["upserted"]) == ids
    assert all(r["flag_status"] == "flagged" for r in flagged["upserted"])
    # None of it has reached Outlook: the jobs are still queued.
    truth = world.harness.messages()
    assert truth[first].is_read is False and truth[second].folder_id == inbox
    assert len(world.queue.jobs) == 5
    # Nothing to do, nothing published (a row already read).
    events = BufferingPublisher()
    world.service.update(world.account_id, world.token, second, {"folder_id": archive}, events)
    assert not events


def test_an_action_sent_through_a_waking_queue_also_leaves_a_wake_for_the_output_binding(outlook: World) -> None:
    """The HTTP functions hand the service a ``WakingJobQueue``: the ACTION job goes on the queue inside the
    call (a failure there is still the service's to undo), and a WAKE goes to the function's queue output
    binding, for which the host wakes its listener at once (mailsync.jobs.WakingJobQueue)."""
    world = outlook
    first, second, third = _inbox(world, 3, is_read=False)
    outboxes = [JobOutbox() for _ in range(3)]
    world.service.update(world.account_id, world.token, first, {"is_read": True}, BufferingPublisher(),
                         WakingJobQueue(world.queue, outboxes[0]))
    world.service.delete(world.account_id, world.token, second, None, BufferingPublisher(),
                         WakingJobQueue(world.queue, outboxes[1]))
    world.service.bulk(world.account_id, world.token, {"message_ids": [third], "action": {"flag_status": "flagged"}},
                       BufferingPublisher(), WakingJobQueue(world.queue, outboxes[2]))
    assert [j.kind for j in world.queue.jobs] == ["action"] * 3
    wakes = [decode_job(body) for outbox in outboxes for body in outbox.bodies()]
    assert [(w.kind, w.account_id) for w in wakes] == [("wake", world.account_id)] * 3
    world.work()
    truth = world.harness.messages()
    assert truth[first].is_read is True and truth[third].flagged is True
    assert truth[second].folder_id != world.harness.inbox_id
    # Nothing to do: nothing queued, no wake. A delayed job (a retry) wakes nobody: it is not due.
    idle = JobOutbox()
    world.service.update(world.account_id, world.token, first, {"is_read": True}, BufferingPublisher(),
                         WakingJobQueue(world.queue, idle))
    assert not idle and world.queue.jobs == []
    WakingJobQueue(world.queue, idle).enqueue(wakes[0], delay_s=2)
    assert not idle and world.queue.delays[-1] == 2
    with pytest.raises(ValueError, match="cannot delay"):
        idle.enqueue(wakes[0], delay_s=2)


def test_the_worker_takes_a_wake_as_done_with_nothing_to_do(storage_env: dict[str, str],
                                                           search_store_url: str) -> None:
    """The app's sync worker: a WAKE is a known kind (never poisoned) whose handler does nothing."""
    from functions._shared.runtime import Runtime
    from mailsync.jobs import JobKind, new_job
    from mailsync.sync.worker import Delivery, Invocation, Outcome

    worker = Runtime(Settings.from_env({**storage_env, "ELASTICSEARCH_URL": search_store_url})).sync_worker
    assert worker.handles(JobKind.WAKE)
    events = BufferingPublisher()
    invocation = Invocation(Delivery(delivery_id="q-1", dequeue_count=1), events)
    assert worker.run(new_job(JobKind.WAKE, uuid.uuid4().hex, reason="wake"), invocation) is Outcome.DONE
    assert not events


def test_a_delta_page_read_before_the_action_never_undoes_it(outlook: World) -> None:
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    stale = world.harness.open().message_changes(world.harness.inbox_id, None)    # read before the action
    assert any(m.message_id == message_id and not m.is_read for m in stale.upserts)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True})
    world.store.upsert_messages(stale.upserts)                                    # ...applied after it
    world.store.refresh()
    assert world.row(message_id).is_read is True
    world.work()
    fresh = world.harness.open().message_changes(world.harness.inbox_id, None)   # read after the provider has it
    world.store.upsert_messages(fresh.upserts)
    world.store.refresh()
    assert world.row(message_id).is_read is True


def test_an_outlook_change_after_the_action_wins(outlook: World) -> None:
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    archive = next(f.folder_id for f in world.mirror.folders.values() if f.role == "archive")
    junk = next(f.folder_id for f in world.mirror.folders.values() if f.role == "junkemail")
    world.service.update(world.account_id, world.token, message_id, {"folder_id": archive})
    world.work()
    world.harness.move(message_id, junk)        # the person moves it again in Outlook, the same second
    world.sync()
    assert world.row(message_id).folder_id == junk


def test_a_move_on_imap_takes_the_new_id_from_the_target(imap: World) -> None:
    world = imap
    (message_id,) = _inbox(world)
    answer = world.service.update(world.account_id, world.token, message_id, {"folder_id": "Archive"})
    assert answer["message"]["folder_id"] == "Archive"
    world.work()
    truth = world.harness.messages()
    assert message_id not in truth
    moved = [m for m in truth.values() if m.folder_id == "Archive" and
             m.subject == world.mirror.messages[message_id].subject]
    assert len(moved) == 1
    assert world.row(message_id) is None
    assert world.row(moved[0].message_id).folder_id == "Archive"
    world.sync()
    assert world.row(moved[0].message_id) is not None


@pytest.mark.parametrize("world_name", ["outlook", "imap"])
def test_delete_moves_to_the_trash_and_permanent_removes(world_name: str, request: pytest.FixtureRequest) -> None:
    world: World = request.getfixturevalue(world_name)
    first, second = _inbox(world, 2)
    trash = next(f.folder_id for f in world.mirror.folders.values() if f.role == "deleteditems")
    answer = world.service.delete(world.account_id, world.token, first, None)
    assert answer["message"]["folder_id"] == trash
    answer = world.service.delete(world.account_id, world.token, second, "true")
    assert answer["removed"] is True
    world.store.refresh()
    assert world.row(second) is None
    world.work()
    truth = world.harness.messages()
    assert first not in truth or truth[first].folder_id == trash
    assert second not in truth


def test_a_definitive_failure_puts_the_providers_truth_back_and_tells_the_page(outlook: World) -> None:
    world = outlook
    first, second = _inbox(world, 2, is_read=False)
    world.service.update(world.account_id, world.token, first, {"is_read": True})
    world.service.update(world.account_id, world.token, second, {"is_read": True})
    world.harness.delete(first, permanently=True)          # gone in Outlook before the job runs
    events = world.work()
    assert world.row(first) is None
    assert world.row(second).is_read is True
    failed = [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED]
    assert [f["message_id"] for f in failed[0]["arguments"][0]["failures"]] == [first]


def test_a_reverted_row_carries_its_folders_epoch(outlook: World) -> None:
    """A resync of the Inbox (epoch 9) runs while a move of one of its messages fails for good. The resync's
    write of the message is refused (the optimistic row, in the other folder, is newer); then the row goes
    back to the Inbox. Written without the Inbox's epoch, the resync's end deleted it as unseen, and no delta
    round lists it again: it did not change in Outlook."""
    world = outlook
    (message_id,) = _inbox(world)
    doomed = world.harness.create_folder("Doomed")
    world.sync()
    world.service.update(world.account_id, world.token, message_id, {"folder_id": doomed})
    world.harness.delete_folder(doomed)               # into Deleted Items,
    world.harness.delete_folder(doomed)               # then for good
    inbox = world.harness.inbox_id
    world.epochs[inbox] = 9                            # the resync began
    assert world.store.upsert_messages([world.mirror.messages[message_id]], epoch=9).skipped == 1
    world.work()
    assert world.row(message_id).folder_id == inbox

    world.store.remove_stale(world.account_id, inbox, 9)   # the resync completes
    world.store.refresh()
    assert world.row(message_id) is not None, "Outlook still has it in the Inbox"


def test_a_resync_begun_between_the_epoch_read_and_the_optimistic_write_keeps_the_row(outlook: World) -> None:
    """The other client moved a message to Deleted Items; the page still shows it in the Inbox, and the user
    moves it there too (a no-op in Outlook: no later delta lists it). Between the service's read of Deleted
    Items' epoch (5) and its optimistic write, a resync of Deleted Items begins (epoch 9), lists the message
    and writes it in 9; then the optimistic row, newer, overwrote it in 5, and the resync's end deleted it as
    unseen: missing for good (the convergence test's rare missing=1 after a burst of resyncs)."""
    world = outlook
    (message_id,) = _inbox(world)
    trash = next(f.folder_id for f in world.mirror.folders.values() if f.role == "deleteditems")
    world.harness.move(message_id, trash)              # in Outlook; the store still says Inbox
    time.sleep(1.1)                                    # past delta's lag: the resync lists it in Deleted Items
    world.epochs[trash] = 5

    def resync_begins() -> None:
        world.epochs[trash] = 9
        listed = Mirror()
        listed.sync(world.harness.open())
        assert world.store.upsert_messages([listed.messages[message_id]], epoch=9).written == 1

    world.after_epochs_read = resync_begins
    world.service.update(world.account_id, world.token, message_id, {"folder_id": trash})
    assert world.after_epochs_read is None, "the service read the epochs"
    world.work()
    world.store.remove_stale(world.account_id, trash, 9)   # the resync completes
    world.store.refresh()
    row = world.row(message_id)
    assert row is not None and row.folder_id == trash, "Outlook has it in Deleted Items"
    assert world.harness.messages()[message_id].folder_id == trash


def test_deleting_a_message_outlook_no_longer_has_leaves_no_row_in_the_trash(outlook: World) -> None:
    """The other client deleted a folder for good, with its mail; the page still shows a message of it, and
    the user deletes it. Outlook answers 404, which is done (deleting what is gone), but the optimistic row
    in Deleted Items stayed: that folder's delta never had the message, so nothing ever removed it (extra)."""
    world = outlook
    (message_id,) = _inbox(world)
    doomed = world.harness.create_folder("Doomed")
    world.harness.move(message_id, doomed)
    world.sync()
    world.harness.delete_folder(doomed)               # into Deleted Items,
    world.harness.delete_folder(doomed)               # then for good, with its mail
    world.service.delete(world.account_id, world.token, message_id, None)
    trash = next(f.folder_id for f in world.mirror.folders.values() if f.role == "deleteditems")
    assert world.row(message_id).folder_id == trash
    events = world.work()
    assert message_id not in world.harness.messages()
    assert world.row(message_id) is None
    assert not [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED], "done, not failed"


def test_a_repeated_patch_and_a_repeated_move_are_done(outlook: World) -> None:
    world = outlook
    (message_id,) = _inbox(world)
    archive = next(f.folder_id for f in world.mirror.folders.values() if f.role == "archive")
    for _ in range(2):
        world.service.update(world.account_id, world.token, message_id, {"folder_id": archive, "is_read": True})
        world.store.refresh()
    events = world.work()
    assert not [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED]
    assert world.harness.messages()[message_id].folder_id == archive


def test_bulk_marks_many_and_reports_unknown_ids(outlook: World) -> None:
    world = outlook
    ids = sorted(world.mirror.messages)[:30]
    answer = world.service.bulk(world.account_id, world.token, {"message_ids": [*ids, "nope"],
                                                                "action": {"is_read": True}})
    assert answer["accepted"] == 30 and answer["not_found"] == ["nope"]
    world.work()
    truth = world.harness.messages()
    assert all(truth[i].is_read for i in ids)


def test_a_bulk_action_too_large_for_one_queue_message_is_still_one_job(outlook: World) -> None:
    """Its list is kept in the ledger and the job names it: one job's batches, not ~19 jobs' fighting over the
    mailbox's 4 request slots. A redelivery after it finished finds the list gone and does nothing."""
    world = outlook
    ids = sorted(m for m, row in world.mirror.messages.items() if row.flag_status.value != "flagged")
    world.service.bulk(world.account_id, world.token, {"message_ids": ids, "action": {"flag_status": "flagged"}})
    (job,) = world.queue.jobs
    assert "batch" in job.attrs and "actions" not in job.attrs, "the list fits one message: test more ids"
    world.work()
    truth = world.harness.messages()
    assert all(truth[i].flagged for i in ids)
    assert world.ledger.get_batch(world.account_id, job.attrs["batch"]) is None       # dropped once done
    world.queue.jobs = [job]
    events = world.work()
    assert not events.messages() and world.queue.jobs == []


# --- reading ------------------------------------------------------------------------------------------------

def test_read_message_sanitises_and_lists_attachments(outlook: World) -> None:
    world = outlook
    graph = world.harness.graph
    found = graph.get("me/messages", params={"$filter": "hasAttachments eq true", "$top": "1",
                                              "$select": "id"}).json()["value"][0]
    body = world.service.read_message(world.account_id, world.token, found["id"])
    assert body["body"]["content_type"] == "html" and "<script" not in body["body"]["html"]
    assert body["attachments"] and body["from"]["address"]
    first = body["attachments"][0]
    data = world.service.read_attachment(world.account_id, world.token, found["id"], first["attachment_id"])
    assert len(data.content) == first["size"]


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    ({}, "empty_change"), ({"is_read": "yes"}, "invalid_field"), ({"flag_status": "red"}, "invalid_field"),
    ({"colour": 1}, "invalid_field"), ([], "invalid_request"), ({"folder_id": "nowhere"}, "unknown_folder"),
])
def test_bad_changes_are_400(outlook: World, body: object, code: str) -> None:
    (message_id,) = _inbox(outlook)
    with pytest.raises(InputError) as caught:
        outlook.service.update(outlook.account_id, outlook.token, message_id, body)
    assert caught.value.code == code
    assert not outlook.queue.jobs


def test_scoping_and_unknown_messages(outlook: World) -> None:
    (message_id,) = _inbox(outlook)
    with pytest.raises(AuthenticationError):
        outlook.service.update(outlook.account_id, "nope", message_id, {"is_read": True})
    with pytest.raises(NotFound):
        outlook.service.update(outlook.account_id, outlook.token, "AAkALgNotAMessage", {"is_read": True})
    with pytest.raises(InputError):
        outlook.service.delete(outlook.account_id, outlook.token, message_id, "maybe")
    with pytest.raises(InputError):
        outlook.service.bulk(outlook.account_id, outlook.token, {"message_ids": ["x"] * 501,
                                                                 "action": {"is_read": True}})
    row = outlook.row(message_id)
    assert replace(row, version=0) == replace(outlook.row(message_id), version=0)
    assert row.flag_status in tuple(FlagStatus)




def test_a_failed_imap_move_into_a_folder_removed_meanwhile_puts_the_message_back(imap: World) -> None:
    """The user moves an Inbox message into a folder another client deletes before the move runs; the
    engine's folder round removes the folder from the store first, and with it the optimistic row (which
    said the message was there), leaving a tombstone one version above it. The move then fails at the
    server. Written at the optimistic version (the unchanged MODSEQ), the Inbox row was refused by that
    tombstone, and no delta round lists a message that did not change: missing for good (the IMAP
    convergence test's every-fault scenario)."""
    world = imap
    message_id, doomed = _moved_into_a_folder_then_deleted(world)
    world.store.remove_folder(world.account_id, doomed)     # the engine's folder-list round
    world.store.refresh()
    assert world.row(message_id) is None
    events = world.work()
    row = world.row(message_id)
    assert row is not None and row.folder_id == world.harness.inbox_id
    failed = [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED]
    assert [f["message_id"] for f in failed[0]["arguments"][0]["failures"]] == [message_id]
    world.sync()                                             # what the Inbox's rounds write agrees
    assert world.row(message_id).folder_id == world.harness.inbox_id


def test_the_undo_of_a_failed_imap_move_does_not_bring_back_a_message_removed_meanwhile(imap: World) -> None:
    """The same failed move, but while the job reads the Inbox's copy to undo it the other client deletes
    the message for good and the folder's removal lands (the optimistic row with it). The undo must not
    beat the tombstone of that removal: the message is gone (written one version above any row, it came
    back for good: the every-fault scenario's ``extra``)."""
    world = imap
    message_id, doomed = _moved_into_a_folder_then_deleted(world)

    def gone_meanwhile(_folder_id: str, _message_id: str) -> None:
        world.factory.after_read = None
        world.harness.delete(message_id, permanently=True)
        world.store.remove_folder(world.account_id, doomed)     # the engine's folder-list round

    world.factory.after_read = gone_meanwhile
    world.work()
    assert message_id not in world.harness.messages()
    assert world.row(message_id) is None


def test_a_failed_action_whose_truth_cannot_be_read_now_is_put_back_later(imap: World) -> None:
    """The same failed move, but the provider cannot be read when the job undoes it (the connection
    drops). The optimistic row was left as it was, in the folder being deleted, "for the next delta
    round" — which never lists a message that did not change — and the folder's removal then deleted it
    from the store. A restore job asks the provider again later."""
    world = imap
    message_id, doomed = _moved_into_a_folder_then_deleted(world)
    drops = [1]

    def dropped(folder_id: str, _message_id: str) -> None:
        if drops:
            drops.pop()
            raise ProviderUnavailable("IMAP connection lost (injected)")

    world.factory.before_read = dropped
    events = world.work()
    failed = [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED]
    assert [f["message_id"] for f in failed[0]["arguments"][0]["failures"]] == [message_id]
    assert [job.attrs.get("restore") for job in world.queue.jobs] == ["1"]
    assert world.queue.delays[-1] == 1.0
    world.store.remove_folder(world.account_id, doomed)     # the engine's folder-list round
    world.store.refresh()
    world.work()                                             # the restore job
    row = world.row(message_id)
    assert row is not None and row.folder_id == world.harness.inbox_id
    assert world.queue.jobs == []


def test_an_action_that_could_not_be_queued_takes_its_claim_and_row_back(outlook: World) -> None:
    """Mark read is queued; mark unread is claimed, then its enqueue fails (the request answers 503). Left
    claimed, the ledger said a newer action owned "read", so the mark-read job dropped it as superseded
    — for an action that never runs: Outlook stayed unread and the store showed unread."""
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True})
    world.queue.down = True
    with pytest.raises(DependencyUnavailable):
        world.service.update(world.account_id, world.token, message_id, {"is_read": False})
    world.queue.down = False
    world.store.refresh()
    assert world.row(message_id).is_read is True          # mark read's row again, not the one never queued
    world.work()
    assert world.harness.messages()[message_id].is_read is True
    assert world.row(message_id).is_read is True
    world.sync()
    assert world.row(message_id).is_read is True



class PublishedLog(BufferingPublisher):
    """A publisher recording each ``publish_changes`` in order (and saying when the first one came)."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[MessagesChanged] = []
        self.heard = threading.Event()

    def publish_changes(self, event: MessagesChanged) -> None:
        super().publish_changes(event)
        self.changes.append(event)
        self.heard.set()


def test_the_optimistic_row_is_published_before_the_job_is_queued(outlook: World) -> None:
    """The path to the user's other pages ends at the optimistic write: the row goes out while the epoch
    re-read and the enqueue still run (one enqueue here waits until the page heard it; published after the
    enqueue, as before, it waited in vain). The job is still queued before the call returns."""
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    events = PublishedLog()
    order: list[str] = []

    class WaitsForThePage(RecordingQueue):
        def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
            order.append("heard" if events.heard.wait(5) else "not heard")
            super().enqueue(job, delay_s=delay_s)

    queue = WaitsForThePage()
    world.service.update(world.account_id, world.token, message_id, {"is_read": True}, events, queue)
    assert order == ["heard"]
    assert [job.kind for job in queue.jobs] == ["action"]
    (published,) = events.changes
    assert [(r.message_id, r.is_read) for r in published.upserted] == [(message_id, True)]


def test_an_action_published_but_not_queued_is_published_again_as_the_store_has_it_back(outlook: World) -> None:
    """The row reached the other pages before the enqueue failed: the rows put back go to them too, at a
    version above the optimistic one (a page keeps the newest), and the earlier action on the message stays
    the one that runs."""
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True})
    world.store.refresh()
    accepted = world.row(message_id)
    world.queue.down = True
    events = PublishedLog()
    with pytest.raises(DependencyUnavailable):
        world.service.update(world.account_id, world.token, message_id, {"is_read": False}, events)
    world.queue.down = False
    optimistic, put_back = events.changes
    assert [(r.message_id, r.is_read) for r in optimistic.upserted] == [(message_id, False)]
    assert [(r.message_id, r.is_read) for r in put_back.upserted] == [(message_id, True)]
    assert put_back.upserted[0].version > optimistic.upserted[0].version > accepted.version
    world.store.refresh()
    assert world.row(message_id).is_read is True
    world.work()
    assert world.harness.messages()[message_id].is_read is True


def test_a_bulk_action_not_queued_drops_its_kept_list(outlook: World) -> None:
    """A bulk action's list is written beside its rows, before the enqueue: when the enqueue fails, the list
    goes with the claims (left, only the hourly purge would take it)."""
    world = outlook
    ids = sorted(m for m, row in world.mirror.messages.items() if row.flag_status.value != "flagged")
    kept: list[str] = []
    put_batch = world.ledger.put_batch

    def recorded(account_id: str, actions: str) -> str:
        kept.append(put_batch(account_id, actions))
        return kept[-1]

    world.ledger.put_batch = recorded  # type: ignore[method-assign]
    world.queue.down = True
    with pytest.raises(DependencyUnavailable):
        world.service.bulk(world.account_id, world.token, {"message_ids": ids, "action": {"flag_status": "flagged"}})
    assert len(kept) == 1, "the list fits one message: test more ids"
    assert world.ledger.get_batch(world.account_id, kept[0]) is None
    world.store.refresh()
    assert not any(world.row(i).flag_status.value == "flagged" for i in ids)
    assert world.queue.jobs == []


def test_deleting_the_row_of_an_imap_move_not_done_yet_deletes_the_message(imap: World) -> None:
    """The page shows a message moved to Archive at once, under the id it had (an IMAP id names its folder:
    the Inbox's), before the move's job ran; the user deletes that row for good. The delete named Archive,
    where the id is no message, and answered "done, gone"; the move, superseded by the newer delete, never
    ran: the message stayed in the Inbox and left the store for good (the every-fault scenario's missing)."""
    world = imap
    (message_id,) = _inbox(world)
    subject = world.mirror.messages[message_id].subject
    world.service.update(world.account_id, world.token, message_id, {"folder_id": "Archive"})
    assert world.row(message_id).folder_id == "Archive"
    world.service.delete(world.account_id, world.token, message_id, "true")
    world.work()
    assert [m for m in world.harness.messages().values() if m.subject == subject] == []
    world.store.refresh()
    assert world.row(message_id) is None
    world.sync()
    assert [m for m in world.mirror.messages.values() if m.subject == subject] == []
