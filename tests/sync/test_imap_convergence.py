"""The convergence property on IMAP: whatever happens during the initial sync, the store ends equal to Dovecot.

The same property as tests/sync/test_convergence.py, with the IMAP
provider plugged into the same engine, store, tables and queue: while the
initial sync of a seeded mailbox runs (through a fault proxy), a person
changes it from another IMAP connection — STORE of \\Seen, \\Flagged and
keywords, MOVE, delete to Trash, EXPUNGE for good, APPEND of new mail,
folder create / rename / delete, and now and then a folder's UIDVALIDITY
changes (a restored server: every cursor of it is void) — while
connections drop mid-FETCH, the server says BYE or NO, workers raise or
die mid-page and jobs arrive twice. Then the changes and faults stop, the
queue drains, and the IMAP STATUS poller runs: it must enqueue the rounds
that pick up the last changes, after which the store equals the mailbox
(folders: name, parent; messages: folder, subject, read, flag, categories,
sender, arrival) and a second poll finds nothing to do.

A second actor, a user of mailsync's own API (tests/sync/user_actor.py),
marks read / unread, flags, moves and deletes what the store shows, at the
same time, through ``ImapActions`` and the same fault proxy. Besides store =
mailbox, every action it was told was accepted must end done or failed,
every failure must reach the page (``actionsFailed``), and for each message
only the user changed (flags only: a move gives an IMAP message a new id)
the mailbox must have the user's actions folded in the order they were
accepted (tests/sync/user_effects.py).

``test_the_imap_property_catches_a_planted_bug`` runs a scenario with a
provider that forgets expunges (drops VANISHED) and checks the property
fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from imapclient import IMAPClient

from mailsync.linking.access import issue_access_token
from mailsync.linking.imap import IMAP, SealedCredentials
from mailsync.models import Account, AccountStatus, MessageBatch, Provider
from mailsync.monitoring.imap_poll import ImapStatusPoller
from mailsync.providers.imap import ImapCredentials, ImapProviderFactory, message_id_of
from mailsync.providers.imap_actions import ImapActionsFactory
from mailsync.providers.imap_session import ImapEndpoint
from mailsync.settings import Settings
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.sync_table import SyncStateTable
from mailsync.store.search_store import SearchStore
from mailsync.sync.engine import SyncEngine
from tests.fixtures.dovecot import LOOPBACK_HOSTS, DovecotServer, ImapUser, rfc822
from tests.linking.tables import LinkingTables, linking_tables
from tests.providers.imap_faults import FaultProxy
from tests.providers.imap_harness import move, seed_messages
from tests.sync.imap_support import Difference, compare_views, imap_view
from tests.sync.support import sync_table
from tests.sync.user_actor import User
from tests.sync.user_effects import expected_state
from tests.sync.world import (
    AccountWorld,
    FaultyQueue,
    KillableState,
    QueuePump,
    RecordingPublisher,
    change_during_sync,
    misbehaving_worker,
)

log = logging.getLogger("tests.sync.imap_convergence")

_SCALE = os.environ.get("MAILSYNC_TEST_SCALE", "small")


@dataclass(frozen=True)
class Scale:
    messages: int
    examples: int
    min_mutations: int
    page_size: int


SCALE = {"small": Scale(messages=800, examples=1, min_mutations=120, page_size=60),
         "large": Scale(messages=20_000, examples=4, min_mutations=1_500, page_size=500)}[_SCALE]


@dataclass(frozen=True)
class Plan:
    seed: int
    bye_rate: float        # per IMAP command of the sync: * BYE and a closed connection
    no_rate: float         # per read command: NO [UNAVAILABLE]
    cut_rate: float        # per FETCH: the connection drops inside the response
    raise_rate: float      # a worker raises before writing a page (the queue redelivers)
    kill_rate: float       # a worker dies before writing a page (no cleanup at all)
    duplicate_rate: float  # a job is delivered twice
    uidvalidity_every: int  # every N mutations a folder gets a new UIDVALIDITY (0: never)


PLANS = st.builds(
    Plan,
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    bye_rate=st.sampled_from([0.0, 0.01, 0.03]),
    no_rate=st.sampled_from([0.0, 0.02, 0.05]),
    cut_rate=st.sampled_from([0.0, 0.03, 0.08]),
    raise_rate=st.sampled_from([0.0, 0.03, 0.08]),
    kill_rate=st.sampled_from([0.0, 0.02]),
    duplicate_rate=st.sampled_from([0.0, 0.1, 0.3]),
    uidvalidity_every=st.sampled_from([0, 50]),
)


# --- the world -----------------------------------------------------------------------------------------

@dataclass
class ImapWorld(AccountWorld):
    settings: Settings
    dovecot: DovecotServer
    user: ImapUser
    proxy: FaultProxy
    store: SearchStore
    tables: LinkingTables
    state: SyncStateTable
    queue: FaultyQueue
    engine: SyncEngine
    factory: ImapProviderFactory
    account: Account
    events: RecordingPublisher = field(default_factory=RecordingPublisher)
    token: str = ""                 # the account's bearer (for the user's API calls)
    actions: Any = None             # the user's MessageActionService: the pump runs ACTION jobs with it

    def poller(self) -> ImapStatusPoller:
        return ImapStatusPoller(self.tables.accounts, self.state, self.factory.connect, self.queue)


class ForgetfulFactory:
    """The planted bug: a provider that drops every removal (expunges never reach the store)."""

    def __init__(self, inner: ImapProviderFactory) -> None:
        self.inner = inner

    def open(self, account: Account) -> Any:
        provider = self.inner.open(account)
        original = provider.message_changes

        def message_changes(folder_id: str, cursor: str | None) -> MessageBatch:
            return replace(original(folder_id, cursor), removals=())

        provider.message_changes = message_changes  # type: ignore[method-assign]
        return provider


def make_imap_world(storage_env: dict[str, str], dovecot: DovecotServer, store: SearchStore, *, plan: Plan,
                    scale: Scale, forgetful: bool = False) -> ImapWorld:
    user = dovecot.add_user()
    n = scale.messages
    user.seed_maildir(seed_messages(random.Random(plan.seed), {
        "INBOX": n // 2, "Archive": n // 4, "Projects": n // 8, "Projects/Old": n - n // 2 - n // 4 - n // 8}))
    proxy = FaultProxy(user.host, user.port, seed=plan.seed)
    settings_ = Settings.from_env({**storage_env, "SYNC_TIME_BUDGET_S": "3", "IMAP_PAGE_SIZE": str(scale.page_size),
                                   "FOLDER_LEASE_S": "20", "IMAP_ALLOW_INSECURE": "1", "IMAP_TIMEOUT_S": "10",
                                   "IMAP_ALLOWED_HOSTS": LOOPBACK_HOSTS})
    tables = linking_tables(settings_)
    now = datetime.now(UTC).replace(microsecond=0)
    address = f"{user.username}@{user.host}"
    account_id = uuid.uuid4().hex
    token, token_hash = issue_access_token(account_id)
    account = tables.accounts.save_with_credential(
        Account(account_id=account_id, provider=Provider.IMAP, status=AccountStatus.SYNCING,
                access_token_hash=token_hash, created_at=now, updated_at=now, address=address, display_name=address),
        ImapCredentials(ImapEndpoint(user.host, proxy.port, "none", user.username), user.password).to_json(),
        kind=IMAP)
    state = sync_table(settings_, lease_s=settings_.folder_lease_s,
                       slot_ttl_s=2 * settings_.sync_time_budget_s + 60, table_class=KillableState)
    queue = FaultyQueue(AzureJobQueue(settings_), random.Random(plan.seed))
    factory = ImapProviderFactory(settings_, SealedCredentials(tables.tokens))
    engine = SyncEngine(settings_, accounts=tables.accounts,
                        providers=ForgetfulFactory(factory) if forgetful else factory, store=store, state=state,
                        queue=queue, rng=random.Random(plan.seed + 1), backoff_cap_s=2.0)
    return ImapWorld(settings_, dovecot, user, proxy, store, tables, state, queue, engine, factory, account,
                     token=token)


# --- a person with another mail client ---------------------------------------------------------------------

class Person:
    """Changes the mailbox over its own IMAP connection (straight to Dovecot, no faults)."""

    def __init__(self, world: ImapWorld, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.client: IMAPClient | None = None
        self.created: list[str] = []
        self.done = 0
        self.counts: dict[str, int] = {}
        self.touched: set[str] = set()   # ids of the messages this person changed (the user's check skips them)

    def _client(self) -> IMAPClient:
        if self.client is None:
            self.client = self.world.user.connect()
        return self.client

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.logout()
            self.client = None

    def folders(self) -> list[str]:
        return [name for flags, _d, name in self._client().list_folders() if b"\\Noselect" not in flags]

    def step(self) -> None:
        self.done += 1
        kind = self.rng.choices(["read", "flag", "keyword", "move", "delete", "purge", "append", "folder_create",
                                 "folder_rename", "folder_delete"], [30, 12, 6, 18, 8, 5, 12, 3, 3, 3])[0]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        try:
            self._step(kind)
        except Exception as exc:   # a racing folder delete, a UIDVALIDITY change: the next step goes on
            log.debug("person step %s failed: %s", kind, exc)
            self.close()

    def _step(self, kind: str) -> None:
        client = self._client()
        folders = self.folders()
        if kind == "append":
            target = self.rng.choice(["INBOX", "INBOX", *folders])
            when = datetime.now(UTC)
            client.append(target, rfc822(f"new mail {self.rng.randrange(10**6)}", date=when), msg_time=when,
                          flags=[b"\\Seen"] if self.rng.random() < 0.3 else [])
            return
        if kind == "folder_create":
            parent = self.rng.choice([None, None, *self.created])
            name = f"Folder {self.rng.randrange(10**4)}" if parent is None else f"{parent}/Sub {self.rng.randrange(99)}"
            client.create_folder(name)
            self.created.append(name)
            return
        if kind in ("folder_rename", "folder_delete"):
            alive = [f for f in self.created if f in folders]
            if not alive:
                return
            folder = self.rng.choice(alive)
            if kind == "folder_rename":
                renamed = f"Renamed {self.rng.randrange(10**4)}"
                client.rename_folder(folder, renamed)
                self.created = [renamed if f == folder else f for f in self.created]
            else:
                children = [f for f in folders if f.startswith(folder + "/")]
                for child in sorted(children, reverse=True):
                    client.delete_folder(child)
                client.delete_folder(folder)
            return
        folder = self.rng.choice(folders)
        info = client.select_folder(folder)
        uids = client.search("ALL")
        if not uids:
            return
        uid = [self.rng.choice(uids)]
        self.touched.add(message_id_of(folder, int(info[b"UIDVALIDITY"]), uid[0]))
        if kind == "read":
            (client.add_flags if self.rng.random() < 0.5 else client.remove_flags)(uid, [b"\\Seen"])
        elif kind == "flag":
            (client.add_flags if self.rng.random() < 0.5 else client.remove_flags)(uid, [b"\\Flagged"])
        elif kind == "keyword":
            (client.add_flags if self.rng.random() < 0.6 else client.remove_flags)(uid, [b"Work"])
        elif kind == "move":
            move(client, uid, self.rng.choice([f for f in folders if f != folder] or [folder]))
        elif kind == "delete" and folder != "Trash":
            move(client, uid, "Trash")
        elif kind in ("purge", "delete"):   # deleting from Trash deletes for good
            client.add_flags(uid, [b"\\Deleted"])
            client.uid_expunge(uid)


# --- the scenario ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    diff: Difference
    mutations: int
    counts: dict[str, int]
    faults: Any
    jobs_after_settling: int
    settle_s: float
    fates: dict[str, int] = field(default_factory=dict)      # the user's actions: queued, retry, done, failed
    unfinished: list[str] = field(default_factory=list)      # accepted actions that never ended done or failed
    not_reported: list[str] = field(default_factory=list)    # failed ones the page was never told of
    not_applied: list[Any] = field(default_factory=list)     # (id, wanted, mailbox) for messages only the user changed
    checked: int = 0                                         # how many such messages there were


def flags_not_applied(user: User, skip: set[str], truth: dict[str, Any]) -> tuple[list[Any], int]:
    """``(id, what the user's actions say, what the mailbox has)`` for each message only the user changed whose
    flags disagree, and how many were checked. Messages the user moved or deleted are left out (their id is
    gone: the move is checked by store = mailbox), as are those gone with a folder or a new UIDVALIDITY."""
    wrong: list[Any] = []
    checked = 0
    for message_id, done in user.accepted.items():
        if message_id in skip or any(a.delete or a.destination is not None for a in done):
            continue
        have = truth.get(message_id)
        if have is None:
            continue
        checked += 1
        want = expected_state(done, None)
        seen = {"isRead": have[2], "flagStatus": "flagged" if have[3] else "notFlagged"}
        if any(seen[key] != value for key, value in want.items()):
            wrong.append((message_id, want, seen))
    return wrong, checked


def run_scenario(plan: Plan, storage_env: dict[str, str], dovecot: DovecotServer, store: SearchStore, *,
                 scale: Scale = SCALE, forgetful: bool = False) -> Outcome:
    world = make_imap_world(storage_env, dovecot, store, plan=plan, scale=scale, forgetful=forgetful)
    pump: QueuePump | None = None
    person = Person(world, random.Random(plan.seed))
    user = User(world, random.Random(plan.seed + 5), ImapActionsFactory(world.factory))
    try:
        world.engine.before_write = misbehaving_worker(plan.seed + 7, kill_rate=plan.kill_rate,
                                                       raise_rate=plan.raise_rate)
        world.queue.duplicate_rate = plan.duplicate_rate
        world.proxy.bye_rate, world.proxy.no_rate, world.proxy.cut_rate = plan.bye_rate, plan.no_rate, plan.cut_rate
        # A plan's fault happens at least once: how many commands pass before the settle quiets the proxy is
        # timing (a fast initial sync sends few FETCHes), so the rates alone may draw none.
        world.proxy.force(byes=int(plan.bye_rate > 0), nos=int(plan.no_rate > 0), cuts=int(plan.cut_rate > 0))
        pump = QueuePump(world, workers=4, visibility_s=2)   # type: ignore[arg-type]
        pump.start()
        world.start_initial_sync()
        restored = random.Random(plan.seed + 3)

        def mutate(stop: threading.Event) -> None:
            while not stop.is_set():
                person.step()
                if person.done % 4 == 0:
                    user.step()
                if plan.uidvalidity_every and person.done % plan.uidvalidity_every == 0:
                    folder = restored.choice(["Archive", "Projects", "Projects/Old"])
                    with contextlib.suppress(Exception):
                        dovecot.set_uidvalidity(world.user, folder, restored.randrange(10**6, 10**9))
                time.sleep(0.01)

        change_during_sync(world, mutate, enough=lambda: person.done >= scale.min_mutations, timeout_s=240)
        person.close()

        # Settle: no more faults; drain; the STATUS poll picks up what the last rounds did not see.
        started = time.monotonic()
        world.proxy.quiet()
        world.engine.before_write = None
        world.queue.duplicate_rate = 0.0
        pump.drain(timeout_s=180)
        world.poller().tick([world.account_id])
        pump.drain(timeout_s=180)
        after = world.poller().tick([world.account_id])
        settle_s = time.monotonic() - started
        difference = compare_views(world.user, world.store, world.account_id)
        log.info("imap scenario %s: %d mutations %s, faults %s, settle %.1f s, pump %s, %s", plan, person.done,
                 person.counts, world.proxy.counts, settle_s, pump.stats, difference.summary())
        reported = {f["message_id"] for f in world.events.failures}
        not_applied, checked = flags_not_applied(user, person.touched | user.failed, imap_view(world.user)[1])
        log.info("user actions: %s, refused %d; %d messages only the user changed, %d wrong %s", user.fates,
                 user.refused, checked, len(not_applied), not_applied[:5])
        return Outcome(difference, person.done, person.counts, world.proxy.counts, after.jobs, settle_s,
                       dict(user.fates), sorted(user.queued - user.ended), sorted(user.failed - reported),
                       not_applied, checked)
    finally:
        if pump is not None:
            pump.stop()
        world.proxy.close()


@pytest.mark.timeout(900)
@settings(max_examples=SCALE.examples, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
          derandomize=_SCALE == "small",
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=PLANS)
def test_store_converges_to_the_imap_mailbox(plan: Plan, storage_env: dict[str, str], dovecot: DovecotServer,
                                             make_store: Callable[..., SearchStore]) -> None:
    outcome = run_scenario(plan, storage_env, dovecot, make_store())
    assert outcome.mutations >= SCALE.min_mutations
    assert not outcome.diff, outcome.diff.summary()
    assert outcome.jobs_after_settling == 0, "once settled, the STATUS poll finds nothing that moved"
    _assert_the_users_actions(outcome)


def _assert_the_users_actions(outcome: Outcome) -> None:
    assert outcome.fates.get("queued", 0) > 0, outcome.fates
    assert outcome.unfinished == [], outcome.fates
    assert outcome.not_reported == [], "a failed action the page was never told of"
    assert outcome.not_applied == [], f"{len(outcome.not_applied)} of {outcome.checked}: {outcome.not_applied[:3]}"


@pytest.fixture
def stormy_plan() -> Iterator[Plan]:
    # Every fault at once, at the highest rates the strategy draws: the example CI always runs.
    yield Plan(seed=424242, bye_rate=0.03, no_rate=0.05, cut_rate=0.08, raise_rate=0.08, kill_rate=0.02,
               duplicate_rate=0.3, uidvalidity_every=50)


@pytest.mark.timeout(900)
def test_converges_with_every_fault_at_once(stormy_plan: Plan, storage_env: dict[str, str], dovecot: DovecotServer,
                                            make_store: Callable[..., SearchStore]) -> None:
    outcome = run_scenario(stormy_plan, storage_env, dovecot, make_store(),
                           scale=replace(SCALE, messages=min(SCALE.messages, 500), min_mutations=80))
    assert outcome.faults.byes and outcome.faults.nos and outcome.faults.cuts, outcome.faults
    assert not outcome.diff, outcome.diff.summary()
    _assert_the_users_actions(outcome)


@pytest.mark.timeout(600)
def test_the_imap_property_catches_a_planted_bug(storage_env: dict[str, str], dovecot: DovecotServer,
                                                 make_store: Callable[..., SearchStore]) -> None:
    quiet = Plan(seed=7, bye_rate=0.0, no_rate=0.0, cut_rate=0.0, raise_rate=0.0, kill_rate=0.0, duplicate_rate=0.0,
                 uidvalidity_every=0)
    outcome = run_scenario(quiet, storage_env, dovecot, make_store(), forgetful=True,
                           scale=Scale(messages=300, examples=1, min_mutations=80, page_size=60))
    assert outcome.counts.get("purge", 0) + outcome.counts.get("move", 0) > 0
    assert outcome.diff.extra, "expunged and moved-away messages left behind must be caught"
