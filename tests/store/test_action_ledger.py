"""The action ledger on the real search node: numbering under concurrency, fields, tenancy, removal."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from mailsync.actions.models import FLAG, PLACE, READ, ActionClaim
from mailsync.errors import StoreUnavailable
from mailsync.store.action_ledger import SearchActionLedger
from mailsync.store.engine import EngineError
from mailsync.store.search_store import SearchStore


def test_each_claim_numbers_above_the_last_and_records_only_its_fields(store: SearchStore) -> None:
    ticks = iter([1_000.0, 1_000.0, 999.0])            # the clock stands still, then goes back
    ledger = SearchActionLedger(store.engine, store.names, clock=lambda: next(ticks))
    first = ledger.claim("acct", [ActionClaim("m1", {READ: True, FLAG: "flagged"})])["m1"].seq
    second = ledger.claim("acct", [ActionClaim("m1", {READ: False})])["m1"].seq
    third = ledger.claim("acct", [ActionClaim("m1", {PLACE: "archive"})])["m1"].seq
    assert first == 1_000_000 and second == first + 1 and third == second + 1
    entry = ledger.latest("acct", ["m1", "never"])
    assert set(entry) == {"m1"}
    assert entry["m1"].seq == third
    assert entry["m1"].fields == {READ: (second, False), FLAG: (first, "flagged"), PLACE: (third, "archive")}
    assert entry["m1"].seq_of(READ) == second


def test_concurrent_claims_on_one_message_never_share_a_number(make_store: Callable[..., SearchStore]) -> None:
    store = make_store()
    ledger = SearchActionLedger(store.engine, store.names, clock=lambda: 0.0)   # numbers from the ledger alone
    got: list[int] = []
    lock = threading.Lock()

    def claim(n: int) -> None:
        for _ in range(5):
            seq = ledger.claim("acct", [ActionClaim("m", {READ: n % 2 == 0}), ActionClaim(f"own{n}", {READ: True})])
            with lock:
                got.append(seq["m"].seq)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 31))             # 30 claims, 30 distinct numbers, none lost
    assert ledger.latest("acct", ["m"])["m"].seq == 30


def test_another_accounts_entries_are_not_seen_and_go_with_the_account(store: SearchStore) -> None:
    ledger = SearchActionLedger.of(store)
    ledger.claim("a", [ActionClaim("m", {READ: True})])
    ledger.claim("b", [ActionClaim("m", {PLACE: ""})])
    assert ledger.latest("a", ["m"])["m"].fields == {READ: (ledger.latest("a", ["m"])["m"].seq, True)}
    assert ledger.latest("b", ["m"])["m"].fields[PLACE][1] == ""
    store.delete_account("a")
    assert ledger.latest("a", ["m"]) == {}
    assert set(ledger.latest("b", ["m"])) == {"m"}


def test_purge_removes_what_no_action_touched_for_the_retention_and_keeps_the_rest(store: SearchStore) -> None:
    ten_days_ago = time.time() - 10 * 24 * 3600
    old = SearchActionLedger(store.engine, store.names, clock=lambda: ten_days_ago)
    ledger = SearchActionLedger.of(store)
    old.claim("a", [ActionClaim("stale", {READ: True}), ActionClaim("again", {READ: True})])
    old.claim("b", [ActionClaim("stale", {FLAG: "flagged"})])
    forgotten = old.put_batch("a", "[]")                   # a poisoned job's list
    ledger.claim("a", [ActionClaim("again", {FLAG: "flagged"}), ActionClaim("fresh", {READ: False})])
    kept = ledger.put_batch("a", "[]")
    assert ledger.purge(7 * 24 * 3600) == 3                 # both accounts' stale entries and the old list
    assert set(ledger.latest("a", ["stale", "again", "fresh"])) == {"again", "fresh"}
    assert ledger.latest("b", ["stale"]) == {}
    assert ledger.get_batch("a", forgotten) is None and ledger.get_batch("a", kept) == "[]"
    assert ledger.purge(7 * 24 * 3600) == 0


def test_release_hands_back_only_the_fields_still_at_the_claims_number(store: SearchStore) -> None:
    ticks = iter(float(t) for t in range(1_000, 1_100))
    ledger = SearchActionLedger(store.engine, store.names, clock=lambda: next(ticks))
    older = ledger.claim("acct", [ActionClaim("m", {READ: True})])["m"]
    lost = ledger.claim("acct", [ActionClaim("m", {READ: False, FLAG: "flagged"}), ActionClaim("new", {READ: True})])
    assert lost["m"].prior == {READ: (older.seq, True)} and lost["new"].prior == {}
    newer = ledger.claim("acct", [ActionClaim("m", {FLAG: "notFlagged"})])["m"]   # takes the flag over
    ledger.release("acct", lost)
    entry = ledger.latest("acct", ["m", "new"])
    assert entry["m"].fields == {READ: (older.seq, True), FLAG: (newer.seq, "notFlagged")}
    assert entry["m"].seq == newer.seq                    # numbers are never handed out again
    assert entry["new"].fields == {}                      # nothing claimed it before
    ledger.release("acct", lost)                          # again: nothing left at its number
    assert ledger.latest("acct", ["m"])["m"].fields == entry["m"].fields
    assert ledger.claim("acct", [ActionClaim("m", {READ: False})])["m"].seq > newer.seq



def test_a_lost_ledger_index_is_a_try_again_later_and_is_not_made_again_by_a_claim(store: SearchStore) -> None:
    # Only a lost store loses the index; the poll tick's generation check recreates it. Until then a
    # claim must be retried (StoreUnavailable), not refused for good, and must not auto-create an
    # unmapped index under the alias's name.
    ledger = SearchActionLedger.of(store)
    ledger.claim("acct", [ActionClaim("m", {READ: True})])
    store.engine.delete_indices([store.names.actions_index])
    with pytest.raises(StoreUnavailable, match="index is missing"):
        ledger.claim("acct", [ActionClaim("m", {READ: False})])
    with pytest.raises(StoreUnavailable):
        ledger.put_batch("acct", "[]")
    with pytest.raises(EngineError) as still_missing:
        store.engine.get_indices([store.names.actions])
    assert still_missing.value.index_missing
