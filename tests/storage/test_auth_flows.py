"""Pending sign-ins against Azurite: sealed, single use under races, expiring."""

from __future__ import annotations

import hashlib
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from mailsync.errors import Conflict, InputError, SignInElsewhere
from mailsync.linking.browser_binding import BrowserBinding
from mailsync.settings import Settings
from mailsync.storage.auth_flows import FLOW_ROW, PendingFlow, TableAuthFlowStore
from mailsync.storage.rest.table import RestTable
from tests.linking.tables import LinkingTables, linking_tables


@pytest.fixture
def t(storage_settings: Settings) -> LinkingTables:
    return linking_tables(storage_settings)


NONCE = BrowserBinding.issue(None)   # the starting browser's sign-in cookie


def pending(ttl: timedelta = timedelta(minutes=10), now: datetime | None = None) -> PendingFlow:
    now = now or datetime.now(UTC)
    return PendingFlow(account_id=uuid.uuid4().hex, provider="outlook",
                       flow={"state": "s", "code_verifier": "verifier-secret-123", "nonce": "n"},
                       return_url="http://127.0.0.1:7071/data.html", created_at=now, expires_at=now + ttl,
                       browser_hash=BrowserBinding.digest(NONCE))


def test_put_take_once(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    flow = pending()
    t.flows.put(state, flow)
    raw = list(t.flows_table.list_entities())
    assert len(raw) == 1
    assert state not in repr(raw) and "verifier-secret-123" not in repr(raw)  # hashed key, sealed flow
    assert NONCE not in repr(raw)  # only the cookie's hash
    taken = t.flows.take(state, NONCE)
    assert taken == flow and not taken.expired()
    with pytest.raises(InputError) as info:
        t.flows.take(state, NONCE)  # reused
    assert info.value.code == "invalid_state"
    assert list(t.flows_table.list_entities()) == []


def test_another_browser_is_refused_and_the_flow_stays_pending(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    flow = pending()
    t.flows.put(state, flow)
    for nonce in (None, BrowserBinding.issue(None), NONCE[:-1] + ("A" if NONCE[-1] != "A" else "B")):
        with pytest.raises(SignInElsewhere) as info:
            t.flows.take(state, nonce)
        assert info.value.http_status == 403 and "different browser" in info.value.message
    assert t.flows.take(state, NONCE) == flow  # the browser that started it still can


def test_a_flow_saved_without_a_browser_binding_is_refused(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    t.flows.put(state, pending())
    [row] = list(t.flows_table.list_entities())
    del row["browser_hash"]   # as rows written before the binding existed
    t.flows_table.upsert_entity(row, mode=UpdateMode.REPLACE)
    for nonce in (None, NONCE, ""):
        with pytest.raises(SignInElsewhere):
            t.flows.take(state, nonce)


def test_unknown_and_malformed_states(t: LinkingTables) -> None:
    for state in ("", "x" * 1000, uuid.uuid4().hex):
        with pytest.raises(InputError):
            t.flows.take(state, NONCE)


def test_a_state_cannot_be_put_twice(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    t.flows.put(state, pending())
    with pytest.raises(Conflict):
        t.flows.put(state, pending())


def test_expired_flows_are_handed_out_once_marked_expired(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    t.flows.put(state, pending(ttl=timedelta(seconds=-1)))
    assert t.flows.take(state, NONCE).expired()
    with pytest.raises(InputError):
        t.flows.take(state, NONCE)


def race_takes(t: LinkingTables, state: str, n: int) -> tuple[list[PendingFlow], list[InputError]]:
    barrier = threading.Barrier(n)
    got: list[PendingFlow] = []
    refused: list[InputError] = []

    def take() -> None:
        barrier.wait()
        try:
            got.append(t.flows.take(state, NONCE))
        except InputError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got, refused


def test_racing_callbacks_get_the_flow_exactly_once(t: LinkingTables) -> None:
    for _ in range(5):
        state = uuid.uuid4().hex
        t.flows.put(state, pending())
        got, refused = race_takes(t, state, 4)
        assert len(got) == 1 and len(refused) == 3


class _TakenRightAfterTheRead:
    """The flows table, where another callback takes the flow between this one's read and its delete."""

    def __init__(self, table: RestTable) -> None:
        self._table = table

    def get_entity(self, partition_key: str, row_key: str) -> object:
        entity = self._table.get_entity(partition_key, row_key)
        self._table.delete_entity(partition_key, row_key)     # the other callback's take
        return entity

    def __getattr__(self, name: str) -> object:
        return getattr(self._table, name)


def test_a_flow_taken_between_the_read_and_the_delete_is_refused(t: LinkingTables) -> None:
    """The take's conditional delete must be the one that removed the row: "already gone" is a refusal."""
    state = uuid.uuid4().hex
    t.flows.put(state, pending())
    racing = TableAuthFlowStore(_TakenRightAfterTheRead(t.flows_table), t.cipher)   # type: ignore[arg-type]
    with pytest.raises(InputError):
        racing.take(state, NONCE)


def test_a_take_leaves_no_row(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    t.flows.put(state, pending())
    t.flows.take(state, NONCE)
    with pytest.raises(ResourceNotFoundError):
        t.flows_table.get_entity(hashlib.sha256(state.encode()).hexdigest(), FLOW_ROW)


def test_a_row_an_older_version_marked_used_is_refused(t: LinkingTables) -> None:
    state = uuid.uuid4().hex
    t.flows.put(state, pending())
    t.flows_table.update_entity({"PartitionKey": hashlib.sha256(state.encode()).hexdigest(), "RowKey": FLOW_ROW,
                                 "used": True}, mode=UpdateMode.MERGE)
    with pytest.raises(InputError):
        t.flows.take(state, NONCE)


def test_purge_removes_only_expired(t: LinkingTables) -> None:
    now = datetime.now(UTC)
    t.flows.put("old", pending(ttl=timedelta(minutes=-5), now=now))
    t.flows.put("fresh", pending(ttl=timedelta(minutes=5), now=now))
    assert t.flows.purge_expired(now) == 1
    assert t.flows.take("fresh", NONCE).account_id
    with pytest.raises(InputError):
        t.flows.take("old", NONCE)
