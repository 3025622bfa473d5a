"""The MessageStore contract, against the embedded OpenSearch node (or ELASTICSEARCH_URL, or osmem).

Every test gets indices of its own (fixture ``store``). Tests call
``store.refresh()`` before searches, as code reading right after writing
must on a real engine (writes become searchable at the next refresh).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailsync.errors import InputError, StoreError, StoreUnavailable
from mailsync.models import (
    AccountStatus,
    Address,
    FlagStatus,
    Folder,
    Mailbox,
    Message,
    MessageQuery,
    Provider,
)
from mailsync.ports import MessageStore
from mailsync.store import seen_marks
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engines import ENGINES, connect
from mailsync.store.mappings import IndexNames, index_settings, messages_mapping
from mailsync.store.search_store import SearchStore
from tests.store.faults import FaultPlan, faulty

pytestmark = pytest.mark.es

BASE = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def msg(account: str, n: int, *, folder: str = "inbox", version: int = 1000, **fields: object) -> Message:
    """Message ``n`` of ``account``: received n minutes after BASE (higher n = newer)."""
    values: dict[str, object] = {
        "subject": f"Message {n}",
        "sender": Address(f"sender{n % 3}@example.com", f"Sender {n % 3}"),
        "to": (Address("me@example.com", "Me"),),
        "received_at": BASE + timedelta(minutes=n),
        "body_preview": f"preview {n}",
        "body_text": f"body of message {n}",
    }
    values.update(fields)
    return Message(account_id=account, message_id=f"m{n}", folder_id=folder, version=version, **values)  # type: ignore[arg-type]


def ids(messages: tuple[Message, ...] | list[Message]) -> list[str]:
    return [m.message_id for m in messages]


def all_ids(store: SearchStore, account: str, **query: object) -> list[str]:
    """Every message id of the account matching ``query``, newest first, following cursors."""
    out: list[str] = []
    cursor = None
    while True:
        page = store.list_messages(account, MessageQuery(limit=50, cursor=cursor, **query))  # type: ignore[arg-type]
        out += ids(page.messages)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def test_adapter_satisfies_the_port(store: SearchStore) -> None:
    port: MessageStore = store   # mypy checks the Protocol; this keeps the test honest at runtime too
    for name in MessageStore.__dict__:
        if not name.startswith("_"):
            assert callable(getattr(port, name)), name


# ---------------------------------------------------------------- writes: idempotence and versions


def test_reapplying_the_same_page_is_idempotent(store: SearchStore) -> None:
    page = [msg("acct1", n) for n in range(20)]
    first = store.upsert_messages(page)
    again = store.upsert_messages(page)
    store.refresh()

    assert first.written == 20 and first.failed_ids == ()
    # Same version again is accepted (external_gte), changes nothing, fails nothing.
    assert again.failed_ids == () and again.written + again.skipped == 20
    assert all_ids(store, "acct1") == [f"m{n}" for n in reversed(range(20))]
    assert store.get_message("acct1", "m7") == page[7]


def test_stale_update_is_ignored(store: SearchStore) -> None:
    newer = msg("acct1", 1, version=2000, is_read=True, flag_status=FlagStatus.FLAGGED)
    older = msg("acct1", 1, version=1000, is_read=False)
    assert store.upsert_messages([newer]).written == 1

    result = store.upsert_messages([older, msg("acct1", 2, version=1000)])

    assert (result.written, result.skipped, result.failed_ids) == (1, 1, ())
    assert result.stale_ids == ("m1",)          # what the engine must not publish either
    assert store.get_message("acct1", "m1") == newer


def test_newer_version_replaces_the_document(store: SearchStore) -> None:
    store.upsert_messages([msg("acct1", 1, version=1000)])
    store.upsert_messages([msg("acct1", 1, version=1001, is_read=True, subject="edited")])

    stored = store.get_message("acct1", "m1")
    assert stored is not None and stored.is_read and stored.subject == "edited" and stored.version == 1001


@pytest.mark.parametrize("order", ["removal_first", "insert_first"])
def test_move_is_processed_in_either_order(store: SearchStore, order: str) -> None:
    store.upsert_messages([msg("acct1", 1, folder="F", version=1000)])
    moved = msg("acct1", 1, folder="G", version=1500)

    if order == "removal_first":
        removal = store.remove_messages("acct1", "F", ["m1"])
        insert = store.upsert_messages([moved])
        assert (removal.written, insert.written) == (1, 1)
    else:
        insert = store.upsert_messages([moved])
        removal = store.remove_messages("acct1", "F", ["m1"])
        assert (insert.written, removal.written, removal.skipped) == (1, 0, 1)
    store.refresh()

    assert store.get_message("acct1", "m1") == moved
    assert all_ids(store, "acct1", folder_id="F") == []
    assert all_ids(store, "acct1", folder_id="G") == ["m1"]


def test_removal_of_an_already_moved_message_is_ignored(store: SearchStore) -> None:
    store.upsert_messages([msg("acct1", 1, folder="G", version=1500), msg("acct1", 2, folder="F")])

    result = store.remove_messages("acct1", "F", ["m1", "m2", "never-existed"])

    assert (result.written, result.skipped, result.failed_ids) == (1, 2, ())
    assert store.get_message("acct1", "m1") is not None
    assert store.get_message("acct1", "m2") is None


def test_replaying_an_old_upsert_after_removal_does_not_resurrect(store: SearchStore) -> None:
    # The deletion leaves a version tombstone (kept for index.gc_deletes, 60 s by default on Elasticsearch).
    old = msg("acct1", 1, folder="F", version=1000)
    store.upsert_messages([old])
    store.remove_messages("acct1", "F", ["m1"])

    assert store.upsert_messages([old]).skipped == 1
    assert store.get_message("acct1", "m1") is None


def test_conditional_removal_loses_to_a_move_that_lands_after_the_read(make_store: Callable[..., SearchStore]
                                                                      ) -> None:
    """A write between the removal's read and its delete makes if_seq_no refuse the delete."""
    plan = FaultPlan()
    racer = make_store()
    store = make_store(wrap=faulty(plan))
    store.upsert_messages([msg("acct1", 1, folder="F", version=1000)])
    moved = msg("acct1", 1, folder="G", version=1500)

    def move_first(items: list[tuple[str, str]]) -> None:
        assert items == [("delete", "acct1:m1")]
        racer.upsert_messages([moved])

    plan.before_bulk = move_first
    result = store.remove_messages("acct1", "F", ["m1"])

    assert (result.written, result.skipped) == (0, 1)
    assert store.get_message("acct1", "m1") == moved
    # One delete was tried and refused (409), then the re-read saw G and sent nothing more.
    assert [r for r in plan.requests if r[0][0] == "delete"] == [[("delete", "acct1:m1")]]


# ---------------------------------------------------------------- bulk faults


def test_partial_bulk_failure_retries_only_the_refused_items(make_store: Callable[..., SearchStore]) -> None:
    plan = FaultPlan(reject={"acct1:m3": 1, "acct1:m7": 2})
    store = make_store(wrap=faulty(plan))
    page = [msg("acct1", n) for n in range(10)]

    result = store.upsert_messages(page)
    store.refresh()

    assert (result.written, result.failed_ids) == (10, ())
    assert len(plan.requests) == 3
    assert len(plan.ids_of(0)) == 10
    assert sorted(plan.ids_of(1)) == ["acct1:m3", "acct1:m7"]
    assert plan.ids_of(2) == ["acct1:m7"]
    assert sorted(all_ids(store, "acct1")) == sorted(f"m{n}" for n in range(10))


def test_concurrent_bulk_writers_keep_every_rule(make_store: Callable[..., SearchStore]) -> None:
    """bulk_writers > 1: chunks in flight together, each still retried alone; one call's result adds them up."""
    plan = FaultPlan(reject={"acct1:m3": 1, "acct1:m17": 1})
    store = make_store(wrap=faulty(plan), bulk_writers=3, chunk_docs=4)
    page = [msg("acct1", n) for n in range(20)] + [msg("acct1", 99, version=-1)]

    result = store.upsert_messages(page)
    stale = store.upsert_messages([msg("acct1", n, version=999) for n in range(20)])
    store.refresh()

    assert (result.written, result.failed_ids) == (20, ("acct1:m99",))
    assert (stale.written, stale.skipped) == (0, 20)
    first_call = plan.requests[:7]   # 5 chunks of <= 4, then the two refused items alone
    assert sorted(len(r) for r in first_call) == [1, 1, 4, 4, 4, 4, 4]
    assert sorted(all_ids(store, "acct1")) == sorted(f"m{n}" for n in range(20))


def test_items_refused_past_the_retries_raise_after_the_rest_is_written(
        make_store: Callable[..., SearchStore]) -> None:
    plan = FaultPlan(reject={"acct1:m2": 100})
    store = make_store(wrap=faulty(plan), max_retries=2)

    with pytest.raises(StoreUnavailable, match="acct1:m2"):
        store.upsert_messages([msg("acct1", n) for n in range(5)])
    store.refresh()

    assert len(plan.requests) == 3   # first try + 2 retries, the retries carrying only m2
    assert plan.ids_of(1) == plan.ids_of(2) == ["acct1:m2"]
    assert sorted(all_ids(store, "acct1")) == ["m0", "m1", "m3", "m4"]
    assert store.dead_letters("acct1") == []   # overload is not poison: nothing dead-lettered


def test_poison_document_is_dead_lettered_and_the_rest_written(search_engine: SearchEngine, store_prefix: str,
                                                               make_store: Callable[..., SearchStore]) -> None:
    """A document the cluster refuses (here: a live mapping that drifted from the code's) is kept, not lost."""
    names = IndexNames(store_prefix)
    drifted = messages_mapping("drifted")
    drifted["properties"]["conversation_id"] = {"type": "long"}
    search_engine.create_index(names.messages_index, mappings=drifted, settings=index_settings(),
                               aliases={names.messages: {"is_write_index": True}})
    plan = FaultPlan()
    store = make_store(wrap=faulty(plan))
    page = [msg("acct1", 1), msg("acct1", 2, conversation_id="AAQkADAwATM3ZmYAZS0"), msg("acct1", 3)]

    result = store.upsert_messages(page)
    store.refresh()

    assert (result.written, result.failed_ids) == (2, ("acct1:m2",))
    sent = [doc_id for request in plan.requests for _, doc_id in request]
    assert sent.count("acct1:m2") == 1                  # a refusal for good is not retried
    assert sorted(all_ids(store, "acct1")) == ["m1", "m3"]
    [letter] = store.dead_letters("acct1")
    assert letter.doc_id == "acct1:m2" and letter.target == "messages" and letter.status == 400
    assert "conversation_id" in letter.reason
    assert letter.document is not None and letter.document["conversation_id"] == "AAQkADAwATM3ZmYAZS0"


def test_invalid_message_is_dead_lettered_without_being_sent(make_store: Callable[..., SearchStore]) -> None:
    plan = FaultPlan()
    store = make_store(wrap=faulty(plan))

    result = store.upsert_messages([msg("acct1", 1), msg("acct1", 2, version=-5)])

    assert (result.written, result.failed_ids) == (1, ("acct1:m2",))
    assert plan.ids_of(0) == ["acct1:m1"]
    [letter] = store.dead_letters("acct1")
    assert letter.error_type == "invalid_version" and letter.document is not None


def test_an_id_too_long_for_the_engine_is_dead_lettered_and_the_page_written(
        make_store: Callable[..., SearchStore]) -> None:
    """Engines refuse ids over 512 bytes with a 400 for the *whole* bulk request: the store keeps them out."""
    plan = FaultPlan()
    store = make_store(wrap=faulty(plan))
    long_id = "é" * 300   # 600 bytes in UTF-8, 300 characters
    page = [msg("acct1", 1), Message(account_id="acct1", message_id=long_id, folder_id="inbox", version=1000),
            msg("acct1", 3)]

    result = store.upsert_messages(page)
    store.upsert_folders([Folder("acct1", "inbox", "Inbox"), Folder("acct1", "f" * 600, "Deep")])
    store.refresh()

    assert (result.written, result.failed_ids) == (2, (f"acct1:{long_id}",))
    assert plan.ids_of(0) == ["acct1:m1", "acct1:m3"]
    assert sorted(all_ids(store, "acct1")) == ["m1", "m3"]
    assert [view.folder.folder_id for view in store.list_folders("acct1")] == ["inbox"]
    letters = {letter.doc_id: letter for letter in store.dead_letters("acct1")}
    assert set(letters) == {f"acct1:{long_id}", f"acct1:folder:{'f' * 600}"}
    assert {letter.error_type for letter in letters.values()} == {"id_too_long"}
    assert store.get_message("acct1", long_id) is None   # reading such an id is no error either


def test_keyword_values_over_the_term_limit_are_kept_not_refused(store: SearchStore) -> None:
    """Lucene refuses a term over 32,766 bytes; ignore_above keeps such values in _source, unindexed."""
    immense = "x" * 40_000
    message = msg("acct1", 1, subject=immense, conversation_id=immense, internet_message_id=f"<{immense}>",
                  categories=(immense, "Blue"))

    result = store.upsert_messages([message, msg("acct1", 2)])
    store.refresh()

    assert (result.written, result.failed_ids) == (2, ())
    assert store.get_message("acct1", "m1") == message
    assert sorted(all_ids(store, "acct1")) == ["m1", "m2"]
    assert store.dead_letters("acct1") == []


def test_an_id_field_over_the_term_limit_is_dead_lettered(make_store: Callable[..., SearchStore]) -> None:
    """Ids have no ignore_above (an unfindable id is worse than a refusal); the engine would refuse the
    document (immense term), so the store refuses it itself, before sending: the same on every engine."""
    plan = FaultPlan()
    store = make_store(wrap=faulty(plan))
    result = store.upsert_messages([msg("acct1", 1, folder="f" * 40_000), msg("acct1", 2)])
    store.refresh()

    assert (result.written, result.failed_ids) == (1, ("acct1:m1",))
    assert plan.ids_of(0) == ["acct1:m2"]
    [letter] = store.dead_letters("acct1")
    assert letter.doc_id == "acct1:m1" and letter.status == 400 and letter.error_type == "invalid_folder_id"


def test_bulk_chunks_are_bounded_by_count_and_bytes(make_store: Callable[..., SearchStore]) -> None:
    plan = FaultPlan()
    by_count = make_store(wrap=faulty(plan), chunk_docs=4)
    by_count.upsert_messages([msg("acct1", n) for n in range(10)])
    assert [len(r) for r in plan.requests] == [4, 4, 2]

    plan.requests.clear()
    by_bytes = make_store(wrap=faulty(plan), chunk_docs=1000, chunk_bytes=3000)
    big = "x" * 1200
    by_bytes.upsert_messages([msg("acct2", n, body_text=big) for n in range(6)])
    assert len(plan.requests) >= 3 and sum(len(r) for r in plan.requests) == 6


# ---------------------------------------------------------------- tenancy


def _two_accounts(store: SearchStore) -> None:
    for account, word in (("alice", "avocado"), ("bob", "blueberry")):
        store.upsert_mailbox(Mailbox(account, f"{account}@example.com", account.title(), Provider.OUTLOOK,
                                     AccountStatus.SYNCED, total_messages=5))
        store.upsert_folders([Folder(account, "inbox", "Inbox", role="inbox", total_count=5, unread_count=5),
                              Folder(account, "archive", "Archive")])
        # Same message ids and folder ids in both accounts: only the account tells them apart.
        store.upsert_messages([msg(account, n, subject=f"{word} {n}", body_text=f"secret {word}",
                                   flag_status=FlagStatus.FLAGGED) for n in range(5)])
    store.refresh()


def test_an_account_never_sees_another_accounts_data(store: SearchStore) -> None:
    _two_accounts(store)

    for me, other_word in (("alice", "blueberry"), ("bob", "avocado")):
        assert len(all_ids(store, me)) == 5
        for query in (MessageQuery(), MessageQuery(folder_id="inbox"), MessageQuery(unread=True),
                      MessageQuery(flagged=True), MessageQuery(q="secret"), MessageQuery(limit=2)):
            page = store.list_messages(me, query)
            assert page.messages and {m.account_id for m in page.messages} == {me}, query
        assert store.list_messages(me, MessageQuery(q=other_word)).messages == ()
        got = store.get_message(me, "m1")
        assert got is not None and got.account_id == me
        many = store.get_messages(me, ["m1", "m2", "nope"])
        assert sorted(many) == ["m1", "m2"] and {m.account_id for m in many.values()} == {me}
        assert many["m1"] == got                              # whole, as get_message reads it
        views = store.list_folders(me)
        assert {v.folder.account_id for v in views} == {me}
        assert {v.folder.folder_id: v.stored_count for v in views} == {"inbox": 5, "archive": 0}
        mailbox = store.get_mailbox(me)
        assert mailbox is not None and mailbox.account_id == me


def test_a_cursor_from_another_account_only_pages_your_own_messages(store: SearchStore) -> None:
    _two_accounts(store)
    bob_cursor = store.list_messages("bob", MessageQuery(limit=2)).next_cursor

    page = store.list_messages("alice", MessageQuery(limit=10, cursor=bob_cursor))

    assert {m.account_id for m in page.messages} == {"alice"}


def test_account_ids_that_could_collide_are_refused(store: SearchStore) -> None:
    # "a" + "b:m1" and "a:b" + "m1" would share the document id "a:b:m1".
    with pytest.raises(InputError):
        store.list_messages("a:b", MessageQuery())
    with pytest.raises(InputError):
        store.get_message("", "m1")
    result = store.upsert_messages([msg("a:b", 1)])
    assert result.failed_ids == ("a:b:m1",) and result.written == 0


def test_deleting_an_account_removes_all_its_documents(store: SearchStore) -> None:
    _two_accounts(store)
    store.upsert_messages([msg("alice", 9, version=-1)])   # a dead letter of alice's too
    assert store.dead_letters("alice")
    store.raise_epoch("alice", "inbox", ["m1"], 3)          # and a seen mark

    store.delete_account("alice")
    store.refresh()

    assert all_ids(store, "alice") == []
    assert store.list_folders("alice") == []
    assert store.get_mailbox("alice") is None
    assert store.get_message("alice", "m1") is None
    assert store.dead_letters("alice") == []
    every_index = ",".join([store.names.messages, store.names.mailboxes, store.names.deadletter, store.names.seen])
    assert store.engine.count(every_index, {"term": {"account_id": "alice"}}) == 0
    assert len(all_ids(store, "bob")) == 5 and len(store.list_folders("bob")) == 2


# ---------------------------------------------------------------- reads


def test_search_after_paging_is_stable_under_concurrent_inserts(store: SearchStore) -> None:
    # Even n only, so inserts can land between existing messages; m20/m21 share a received time (id tiebreak).
    original = [msg("acct1", n) for n in range(0, 40, 2)]
    original.append(msg("acct1", 21, received_at=BASE + timedelta(minutes=20)))
    store.upsert_messages(original)
    store.refresh()

    seen: list[str] = []
    page = store.list_messages("acct1", MessageQuery(limit=7))
    seen += ids(page.messages)
    inserts = iter([
        [msg("acct1", n) for n in (101, 102, 103)],                    # newer than everything: before the cursor
        [msg("acct1", n) for n in (25, 13, 1)],                        # between existing ones, after the cursor
        [msg("acct1", 23, received_at=BASE + timedelta(minutes=20))],  # same time as the m20/m21 pair
    ])
    while page.next_cursor is not None:
        batch = next(inserts, [])
        if batch:
            store.upsert_messages(batch)
            store.refresh()
        page = store.list_messages("acct1", MessageQuery(limit=7, cursor=page.next_cursor))
        seen += ids(page.messages)

    assert len(seen) == len(set(seen)), "a message was listed twice"
    assert set(ids(original)) <= set(seen), "a message that existed throughout was skipped"
    assert not {"m101", "m102", "m103"} & set(seen)


def test_list_is_newest_first_with_filters_and_full_text(store: SearchStore) -> None:
    store.upsert_messages([
        msg("acct1", 1, is_read=True, subject="Quarterly report", sender=Address("alice@contoso.com", "Alice Smith")),
        msg("acct1", 2, flag_status=FlagStatus.FLAGGED, subject="Lunch?", body_text="<p>Quarterly <b>lunch</b></p>"),
        msg("acct1", 3, folder="archive", subject="Invoice", sender=Address("billing@fabrikam.com", "Billing")),
        msg("acct1", 4, subject="Hello", body_preview="see the invoice attached"),
    ])
    store.refresh()

    assert all_ids(store, "acct1") == ["m4", "m3", "m2", "m1"]
    assert all_ids(store, "acct1", folder_id="inbox") == ["m4", "m2", "m1"]
    assert all_ids(store, "acct1", unread=True) == ["m4", "m3", "m2"]
    assert all_ids(store, "acct1", unread=False) == ["m1"]
    assert all_ids(store, "acct1", flagged=True) == ["m2"]
    assert all_ids(store, "acct1", flagged=False) == ["m4", "m3", "m1"]
    assert all_ids(store, "acct1", q="quarterly") == ["m2", "m1"]        # subject and (HTML-stripped) body
    assert all_ids(store, "acct1", q="alice") == ["m1"]                  # sender name
    assert all_ids(store, "acct1", q="fabrikam") == ["m3"]               # sender address
    assert all_ids(store, "acct1", q="invoice") == ["m4", "m3"]          # preview and subject
    assert all_ids(store, "acct1", q="quarterly lunch") == ["m2"]        # every word must match
    assert all_ids(store, "acct1", q="invoice", folder_id="inbox") == ["m4"]
    listed = store.list_messages("acct1", MessageQuery(limit=1)).messages[0]
    assert listed.body_text is None                                     # lists leave the body out
    full = store.get_message("acct1", "m2")
    assert full is not None and full.body_text == "Quarterly lunch"


def test_quoted_phrases_match_words_in_order_and_times_survive(store: SearchStore) -> None:
    # The text fields keep positions (a quoted phrase needs them) though they write no norms, and the
    # times kept only in _source come back to the millisecond though the engine does not parse them.
    sent = datetime(2025, 2, 28, 23, 59, 59, 123_000, tzinfo=UTC)
    store.upsert_messages([
        msg("acct1", 1, subject="the quarterly report is late", sent_at=sent),
        msg("acct1", 2, subject="quarterly figures for the report", modified_at=sent + timedelta(days=1)),
        msg("acct1", 3, subject="x", sender=Address("quarterly.report@contoso.com", "Reports")),
    ])
    store.refresh()

    assert all_ids(store, "acct1", q='"quarterly report"') == ["m3", "m1"]   # subject; the address split
    assert all_ids(store, "acct1", q="quarterly report") == ["m3", "m2", "m1"]
    assert all_ids(store, "acct1", q='"report quarterly"') == []
    first, second = store.get_message("acct1", "m1"), store.get_message("acct1", "m2")
    assert first is not None and first.sent_at == sent and first.received_at == BASE + timedelta(minutes=1)
    assert second is not None and second.modified_at == sent + timedelta(days=1)


def test_bad_cursor_and_limits_are_input_errors(store: SearchStore) -> None:
    for cursor in ("not-a-cursor", "eyJ2IjoxfQ", "e30"):
        with pytest.raises(InputError):
            store.list_messages("acct1", MessageQuery(cursor=cursor))
    for limit in (0, 10_000):
        with pytest.raises(InputError):
            store.list_messages("acct1", MessageQuery(limit=limit))


def test_folder_counts_come_from_the_stored_messages(store: SearchStore) -> None:
    store.upsert_folders([Folder("acct1", "inbox", "Inbox", role="inbox", total_count=3, unread_count=2),
                          Folder("acct1", "sub", "Sub", parent_id="inbox")], phase="initial")
    store.upsert_messages([msg("acct1", 1, is_read=True), msg("acct1", 2), msg("acct1", 3, folder="sub")])
    store.upsert_folders([Folder("acct1", "inbox", "Inbox renamed", role="inbox", total_count=3, unread_count=2)])
    store.upsert_folders([Folder("acct1", "sub", "Sub", parent_id=None)], phase="incremental")
    store.refresh()

    views = {v.folder.folder_id: v for v in store.list_folders("acct1")}

    assert (views["inbox"].stored_count, views["inbox"].stored_unread) == (2, 1)
    assert (views["sub"].stored_count, views["sub"].stored_unread) == (1, 1)
    assert views["inbox"].folder.name == "Inbox renamed" and views["inbox"].phase == "initial"  # phase kept
    assert views["inbox"].folder.total_count == 3 and views["inbox"].folder.role == "inbox"
    assert views["sub"].phase == "incremental" and views["sub"].folder.parent_id is None


def test_setting_a_folders_phase_keeps_its_name_and_never_recreates_it(store: SearchStore) -> None:
    store.upsert_folders([Folder("acct1", "sub", "Sub", parent_id="inbox")], phase="initial")
    store.upsert_folders([Folder("acct1", "sub", "Renamed", parent_id=None)])   # the folder list's rename

    assert store.set_folder_phase("acct1", "sub", "incremental")
    assert not store.set_folder_phase("acct1", "gone", "incremental")
    store.refresh()

    views = {v.folder.folder_id: v for v in store.list_folders("acct1")}
    assert set(views) == {"sub"}, "a phase for a removed folder brings nothing back"
    assert views["sub"].phase == "incremental"
    assert (views["sub"].folder.name, views["sub"].folder.parent_id) == ("Renamed", None)


def test_setting_a_phase_never_auto_creates_a_deleted_index(store: SearchStore) -> None:
    store.engine.delete_indices([store.names.mailboxes_index])

    with pytest.raises(StoreUnavailable):
        store.set_folder_phase("acct1", "sub", "incremental")
    assert not store.engine.index_exists(store.names.mailboxes)


def test_remove_folder_deletes_the_folder_and_its_messages(store: SearchStore) -> None:
    store.upsert_folders([Folder("acct1", "inbox", "Inbox"), Folder("acct1", "old", "Old")])
    store.upsert_messages([msg("acct1", 1), msg("acct1", 2, folder="old"), msg("acct1", 3, folder="old")])

    store.remove_folder("acct1", "old")
    store.refresh()

    assert [v.folder.folder_id for v in store.list_folders("acct1")] == ["inbox"]
    assert all_ids(store, "acct1") == ["m1"]


def test_mailbox_document_round_trips(store: SearchStore) -> None:
    mailbox = Mailbox("acct1", "me@example.com", "Me", Provider.IMAP, AccountStatus.SYNCING, total_messages=42,
                      last_sync_at=BASE)
    store.upsert_mailbox(mailbox)
    assert store.get_mailbox("acct1") == mailbox
    assert store.get_mailbox("acct2") is None


# ---------------------------------------------------------------- resync, generation, bulk load


def test_resync_epoch_cleanup_removes_only_what_the_resync_did_not_see(store: SearchStore) -> None:
    store.upsert_messages([msg("acct1", n) for n in range(6)], epoch=1)
    store.upsert_messages([msg("acct1", 10, folder="other")], epoch=1)
    store.upsert_messages([msg("acct1", n, version=1000) for n in (0, 1, 2)], epoch=2)   # the resync's pages

    deleted = store.remove_stale("acct1", "inbox", 2)
    store.refresh()

    assert deleted == 3
    assert all_ids(store, "acct1") == ["m10", "m2", "m1", "m0"]


def test_a_resync_keeps_a_message_stored_at_a_newer_version_than_it_read(store: SearchStore) -> None:
    # A user action's optimistic row is ahead of the provider; the resync's older write is refused,
    # yet it saw the message: remove_stale must not delete it. A deleted one stays deleted.
    store.upsert_messages([msg("acct1", 0, version=5000), msg("acct1", 1, version=5000)], epoch=1)
    store.remove_messages("acct1", "inbox", ["m1"])
    result = store.upsert_messages([msg("acct1", 0, version=1000), msg("acct1", 1, version=1000),
                                    msg("acct1", 2, version=1000)], epoch=2)
    assert (result.written, result.skipped) == (1, 2)
    store.refresh()

    assert store.remove_stale("acct1", "inbox", 2) == 0
    store.refresh()
    assert all_ids(store, "acct1") == ["m2", "m0"]
    assert store.get_message("acct1", "m0").version >= 5000


def test_a_stale_page_of_the_old_folder_never_marks_a_moved_message_seen(store: SearchStore) -> None:
    # m0 moved F→G while G ran a full round (epoch 9): G's round wrote it. F's stream then writes a page it
    # read before the move (F's epoch 5), refused since G's copy is newer. F saw it in F, not in G:
    # G's remove_stale must keep it, and F's may not find it at all.
    store.upsert_messages([msg("acct1", 0, folder="F", version=1000)], epoch=5)
    store.upsert_messages([msg("acct1", 0, folder="G", version=2000)], epoch=9)
    assert store.upsert_messages([msg("acct1", 0, folder="F", version=1000)], epoch=5).skipped == 1
    store.refresh()

    assert store.remove_stale("acct1", "G", 9) == 0
    assert store.remove_stale("acct1", "F", 6) == 0
    store.refresh()
    stored = store.get_message("acct1", "m0")
    assert stored is not None and stored.folder_id == "G"


def test_a_refused_write_never_lowers_the_stored_epoch(store: SearchStore) -> None:
    # A resync (epoch 9) stored m0 at a newer version; an older write carrying the folder's previous
    # epoch (an optimistic row that read the epochs before the resync began) is refused: it must not
    # turn the resync's mark back to 5, or the resync's remove_stale deletes a message it saw.
    store.upsert_messages([msg("acct1", 0, version=2000)], epoch=9)
    assert store.upsert_messages([msg("acct1", 0, version=1000)], epoch=5).skipped == 1
    store.refresh()

    assert store.remove_stale("acct1", "inbox", 9) == 0
    store.refresh()
    assert store.get_message("acct1", "m0") is not None


def _stored_version(store: SearchStore, account: str, message_id: str) -> int | None:
    entry = store.engine.mget(store.names.messages, [f"{account}:{message_id}"], routing=account,
                              source_includes=["folder_id"])[0]
    return int(entry["_version"]) if entry.get("found") else None


def test_raise_epoch_marks_only_copies_still_in_the_folder(store: SearchStore) -> None:
    # A user action learnt of inbox's resync (epoch 9) after writing its rows in 5: m0 is kept; m1 has
    # moved on to G (G's round owns it: inbox's mark must not keep it from G's resync), m2 is marked 12
    # already (kept), m3 is gone (stays gone).
    store.upsert_messages([msg("acct1", 0), msg("acct1", 3)], epoch=5)
    store.upsert_messages([msg("acct1", 1, folder="G")], epoch=5)
    store.upsert_messages([msg("acct1", 2)], epoch=12)
    store.remove_messages("acct1", "inbox", ["m3"])

    store.raise_epoch("acct1", "inbox", ["m0", "m1", "m2", "m3"], 9)

    assert store.get_message("acct1", "m3") is None
    assert store.remove_stale("acct1", "inbox", 9) == 0
    assert store.remove_stale("acct1", "G", 6) == 1      # G's resync did not see m1: inbox's mark is no sighting
    store.refresh()
    assert all_ids(store, "acct1") == ["m2", "m0"]


def test_an_epoch_mark_leaves_the_version_alone_so_equal_writes_and_undos_still_win(store: SearchStore) -> None:
    # IMAP versions are MODSEQs, and equal wins: a failed action's undo, or a round re-writing the same
    # MODSEQ, lands on a row at that version. The mark was a partial update, which raised the document's
    # external version by one (7 -> 8): the equal write was refused, and the undo "one above the
    # removal's tombstone" (mailsync.actions.versions) was one short.
    store.upsert_messages([msg("acct1", 0, version=7), msg("acct1", 1, version=7)], epoch=5)
    store.raise_epoch("acct1", "inbox", ["m0"], 9)                       # a user action's late mark
    assert store.upsert_messages([msg("acct1", 1, version=6)], epoch=9).skipped == 1   # a refused page's carry
    assert (_stored_version(store, "acct1", "m0"), _stored_version(store, "acct1", "m1")) == (7, 7)

    undone = store.upsert_messages([msg("acct1", 0, version=7, is_read=True)], epoch=5)
    rewritten = store.upsert_messages([msg("acct1", 1, version=7, is_read=True)], epoch=9)
    assert (undone.written, rewritten.written) == (1, 1)
    assert store.get_message("acct1", "m0").is_read and store.get_message("acct1", "m1").is_read

    store.remove_messages("acct1", "inbox", ["m0"])                     # its tombstone is one above: 8
    assert store.upsert_messages([msg("acct1", 0, version=8)], epoch=9).written == 1
    assert store.remove_stale("acct1", "inbox", 9) == 0


def test_remove_stale_drops_the_folders_older_marks(store: SearchStore) -> None:
    # The resync of epoch 9 refused m0's page (an optimistic row ahead) and kept it on that mark; once
    # the resync is over the mark keeps nothing: the next resync (12) that does not list m0 deletes it.
    store.upsert_messages([msg("acct1", 0, version=5000)], epoch=5)
    store.upsert_messages([msg("acct1", 0, version=1000)], epoch=9)
    store.raise_epoch("acct1", "other", ["m7"], 4)     # another folder's marks are left alone

    assert store.remove_stale("acct1", "inbox", 9) == 0
    marks = store.engine.count(store.names.seen, {"term": {"account_id": "acct1"}})
    assert marks == 2
    assert store.remove_stale("acct1", "inbox", 12) == 1
    store.engine.refresh([store.names.seen])
    assert store.engine.count(store.names.seen, {"term": {"folder_id": "inbox"}}) == 0
    assert store.engine.count(store.names.seen, {"term": {"folder_id": "other"}}) == 1


def test_a_resync_keeps_every_message_it_saw_past_one_terms_clause(store: SearchStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The marks are excluded from the deletion in terms clauses of at most TERMS_PER_CLAUSE ids each
    # (an engine refuses a terms query over index.max_terms_count values).
    monkeypatch.setattr(seen_marks, "TERMS_PER_CLAUSE", 2)
    store.upsert_messages([msg("acct1", n) for n in range(7)], epoch=5)
    store.raise_epoch("acct1", "inbox", ["m0", "m1", "m2", "m3", "m4"], 9)

    assert store.remove_stale("acct1", "inbox", 9) == 2
    store.refresh()
    assert all_ids(store, "acct1") == ["m4", "m3", "m2", "m1", "m0"]


def test_generation_is_stable_and_changes_when_indices_are_recreated(store: SearchStore) -> None:
    first = store.generation()
    assert first == store.ensure_ready() == store.generation()
    store.upsert_messages([msg("acct1", 1)])

    store.engine.delete_indices([store.names.messages_index])
    second = store.generation()           # notices, recreates the missing index

    assert second != first
    assert second == store.generation()
    assert store.upsert_messages([msg("acct1", 2)]).written == 1   # the recreated index works

    store.engine.delete_indices([store.names.deadletter_index])
    assert store.generation() == second                              # dead letters are not mail...
    assert store.engine.alias_exists(store.names.deadletter)   # ...but the index comes back


def test_the_generation_read_fetches_only_each_indexs_identity(store: SearchStore) -> None:
    # Every sync invocation reads the generation: the whole mappings were most of that answer.
    found = store.engine.get_indices([store.names.messages, store.names.mailboxes])
    assert len(found) == 2
    for info in found.values():
        assert set(info) == {"mappings", "settings"} and set(info["mappings"]) == {"_meta"}
        assert set(info["settings"]) == {"index"} and set(info["settings"]["index"]) == {"uuid"}


def test_writes_never_auto_create_a_deleted_index(store: SearchStore) -> None:
    store.engine.delete_indices([store.names.messages_index])

    with pytest.raises(StoreUnavailable):
        store.upsert_messages([msg("acct1", 1)])
    assert not store.engine.index_exists(store.names.messages)
    assert store.list_messages("acct1", MessageQuery()).messages == ()   # reads: nothing stored


def test_a_conditional_removal_on_a_deleted_index_is_retried_not_skipped(store: SearchStore) -> None:
    # A multi-get answers a missing index (or a failed shard) per document; read as "already gone", the
    # round would count the removal done and never make it once the index is back.
    store.upsert_messages([msg("acct1", 1)])
    store.engine.delete_indices([store.names.messages_index])

    with pytest.raises(StoreUnavailable):
        store.remove_messages("acct1", "inbox", ["m1"])


def test_bulk_load_relaxes_and_restores_refresh_interval(store: SearchStore) -> None:
    def interval() -> str | None:
        got = store.engine.get_settings(store.names.messages)
        return next(iter(got.values()))["settings"]["index"].get("refresh_interval")

    before = interval()
    store.begin_bulk_load("acct1")
    store.begin_bulk_load("acct2")
    assert interval() == "30s"
    store.end_bulk_load("acct1")
    assert interval() == "30s"          # acct2 is still loading
    with store.bulk_load("acct3"):
        store.upsert_messages([msg("acct3", 1)])
    assert interval() == "30s"
    store.end_bulk_load("acct2")
    assert interval() == before


def _refresh_interval(store: SearchStore) -> str | None:
    got = store.engine.get_settings(store.names.messages)
    value = next(iter(got.values()))["settings"]["index"].get("refresh_interval")
    return None if value is None else str(value)


def test_bulk_loads_count_each_holder_of_one_account(store: SearchStore) -> None:
    # Two workers load two folders of the same account: the first to finish must not end the other's load.
    store.begin_bulk_load("acct1", "INBOX")
    store.begin_bulk_load("acct1", "Archive/2019 " + "x" * 600)   # any folder id: the lease id is hashed
    store.end_bulk_load("acct1", "INBOX")
    assert _refresh_interval(store) == "30s"
    store.begin_bulk_load("acct1", "INBOX")   # a continuation of the same folder: the same lease again
    store.end_bulk_load("acct1", "INBOX")
    assert _refresh_interval(store) == "30s"
    store.end_bulk_load("acct1", "Archive/2019 " + "x" * 600)
    assert _refresh_interval(store) is None


def test_a_search_waits_for_a_just_created_shard_and_an_outage_still_fails(
        make_store: Callable[..., SearchStore]) -> None:
    # An index is in the cluster state before its primary shard starts: a search in between (the
    # page reading while the poll tick recreates a lost store) is answered 503 "all shards failed".
    # The fresh-clone suite's restart test got that as a 503 for the page once. A read waits out the
    # shard's start; a shard that stays down is still the caller's StoreUnavailable.
    refusals = {"left": 0}

    class ShardStarting:
        def __init__(self, engine: SearchEngine) -> None:
            self._engine = engine

        def __getattr__(self, name: str) -> Any:
            return getattr(self._engine, name)

        def search(self, index: str, body: dict[str, Any], *, routing: str | None = None) -> dict[str, Any]:
            if refusals["left"] > 0:
                refusals["left"] -= 1
                raise EngineError(503, "search_phase_execution_exception", "all shards failed")
            return self._engine.search(index, body, routing=routing)

    store = make_store(wrap=ShardStarting)
    store.upsert_messages([msg("acct1", 1)])
    store.refresh()
    refusals["left"] = 2
    assert [m.message_id for m in store.list_messages("acct1", MessageQuery()).messages] == ["m1"]
    assert refusals["left"] == 0
    refusals["left"] = 100
    with pytest.raises(StoreUnavailable):
        store.list_messages("acct1", MessageQuery())


def test_a_begin_racing_the_last_end_keeps_its_relaxed_refresh(make_store: Callable[..., SearchStore]) -> None:
    # The end counted no live lease; before it restores the default, another worker's begin writes
    # its lease and relaxes the interval. The restore then lands under a running load: the end must
    # count again and relax once more (before, that load ran at the default refresh to its end).
    racing: list[SearchStore] = []

    class BeginJustBeforeTheRestore:
        def __init__(self, engine: SearchEngine) -> None:
            self._engine = engine
            self.armed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self._engine, name)

        def put_settings(self, index: str, settings: dict[str, Any]) -> None:
            if self.armed and settings == {"index": {"refresh_interval": None}}:
                self.armed = False
                racing[0].begin_bulk_load("acct2")
            self._engine.put_settings(index, settings)

    wrapper: list[BeginJustBeforeTheRestore] = []

    def wrap(engine: SearchEngine) -> SearchEngine:
        wrapper.append(BeginJustBeforeTheRestore(engine))
        return wrapper[0]   # type: ignore[return-value]

    ending = make_store(wrap=wrap)
    racing.append(make_store())   # the same prefix: the same indices, another worker
    ending.begin_bulk_load("acct1")
    wrapper[0].armed = True
    ending.end_bulk_load("acct1")
    assert _refresh_interval(ending) == "30s", "acct2 is loading"
    racing[0].end_bulk_load("acct2")
    assert _refresh_interval(ending) is None


def test_a_dead_loaders_relaxed_refresh_is_undone_once_its_lease_expired(
        make_store: Callable[..., SearchStore], store: SearchStore) -> None:
    now = [datetime.now(UTC)]
    loader = make_store(bulk_lease_s=60.0, clock=lambda: now[0])
    judge = make_store(clock=lambda: now[0])    # the poll tick's store, in another process
    loader.begin_bulk_load("acct1", "INBOX")   # ...and the worker dies: no end_bulk_load
    assert not judge.expire_bulk_loads(), "the lease is live: the load may still run"
    assert _refresh_interval(store) == "30s"
    store.upsert_messages([msg("acct1", 1)])
    now[0] += timedelta(seconds=61)
    assert judge.expire_bulk_loads()
    assert _refresh_interval(store) is None
    assert ids(store.list_messages("acct1", MessageQuery()).messages) == ["m1"], "and refreshed at once"
    assert not judge.expire_bulk_loads(), "nothing left to undo"


def test_expiring_bulk_loads_leaves_an_interval_an_operator_chose(store: SearchStore) -> None:
    store.engine.put_settings(store.names.messages, {"index": {"refresh_interval": "5s"}})
    assert not store.expire_bulk_loads()
    assert _refresh_interval(store) == "5s"


@pytest.mark.parametrize("engine", ENGINES)
def test_unreachable_store_is_unavailable(engine: str) -> None:
    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(StoreUnavailable):
        connect(url, request_timeout_s=2)   # auto: asking the server which engine it is fails the same way
    dead = SearchStore(connect(url, engine=engine, request_timeout_s=2))
    with pytest.raises(StoreUnavailable):
        dead.list_messages("acct1", MessageQuery())
    with pytest.raises(StoreUnavailable):
        dead.upsert_messages([msg("acct1", 1)])
    with pytest.raises(StoreUnavailable):
        dead.generation()


def test_foreign_index_behind_the_alias_is_refused(search_engine: SearchEngine, store_prefix: str,
                                                   make_store: Callable[..., SearchStore]) -> None:
    names = IndexNames(store_prefix)
    search_engine.create_index(names.messages_index, aliases={names.messages: {}},
                               mappings={"properties": {"x": {"type": "keyword"}}})
    with pytest.raises(StoreError, match="not created by mailsync"):
        make_store()
