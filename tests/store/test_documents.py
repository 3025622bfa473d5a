"""Message/Folder/Mailbox ↔ document mapping (pure; no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsync.errors import InputError
from mailsync.models import AccountStatus, Address, FlagStatus, Folder, Mailbox, Message, Provider
from mailsync.store import documents as d
from mailsync.store.mappings import IndexNames, mailboxes_mapping, messages_mapping
from mailsync.store.reads import decode_cursor, encode_cursor

WHEN = datetime(2025, 3, 1, 9, 30, 15, 123000, tzinfo=UTC)


def full_message() -> Message:
    return Message(
        account_id="acct1", message_id="AAMkAGI2=", folder_id="inbox", version=1_740_821_415_123,
        subject="Hello", sender=Address("a@example.com", "A"), to=(Address("b@example.com", "B"),),
        cc=(Address("c@example.com"),), received_at=WHEN, sent_at=WHEN - timedelta(minutes=1),
        modified_at=WHEN + timedelta(hours=1), is_read=True, flag_status=FlagStatus.COMPLETE,
        importance="high", categories=("Red", "Work"), has_attachments=True, conversation_id="conv",
        internet_message_id="<x@y>", body_preview="Hi there", body_text="Hi there, plain text.", is_draft=True,
    )


def test_message_round_trips_through_its_document() -> None:
    message = full_message()
    doc = d.message_to_document(message, epoch=7)
    assert doc["sync_epoch"] == 7 and doc["sort_ts"] == int(WHEN.timestamp() * 1000)
    assert doc["received_at"] == "2025-03-01T09:30:15.123Z"
    assert d.message_from_document(doc) == message


def test_every_document_field_is_in_the_strict_mapping() -> None:
    mapped = set(messages_mapping("g")["properties"])
    assert set(d.message_to_document(full_message())) <= mapped
    folder_doc = d.folder_to_document(Folder("a", "f", "F", "p", "inbox", 1, 2, 3), phase="initial")
    mailbox_doc = d.mailbox_to_document(Mailbox("a", "x@y", "X", Provider.OUTLOOK, AccountStatus.SYNCED, 5, WHEN))
    assert (set(folder_doc) | set(mailbox_doc)) <= set(mailboxes_mapping("g")["properties"])


def test_the_messages_mapping_indexes_only_what_reads_use_and_parses_nothing_it_keeps() -> None:
    # Every write of an initial sync pays for each indexed field: text without norms (lists sort by
    # sort_ts, nothing is ranked), times kept only in _source without the engine parsing them.
    properties = messages_mapping("g")["properties"]
    texts = {name: spec for name, spec in properties.items() if spec.get("type") == "text"}
    texts.update({"from.name": properties["from"]["properties"]["name"],
                  "from.address.text": properties["from"]["properties"]["address"]["fields"]["text"]})
    assert set(texts) == {"subject", "body_preview", "body_text", "from.name", "from.address.text"}
    assert all(spec["norms"] is False and "index_options" not in spec for spec in texts.values())
    for name in ("received_at", "sent_at", "modified_at", "indexed_at"):
        assert properties[name] == {"type": "keyword", "index": False, "doc_values": False}, name
    assert not [name for name, spec in properties.items() if spec.get("type") == "date"]


def test_minimal_message_round_trips_and_sorts_by_fallback_time() -> None:
    bare = Message(account_id="a", message_id="m", folder_id="f", version=0)
    assert d.message_from_document(d.message_to_document(bare)) == bare
    assert d.sort_timestamp(bare) == 0
    sent_only = Message(account_id="a", message_id="m", folder_id="f", version=0, sent_at=WHEN)
    assert d.sort_timestamp(sent_only) == int(WHEN.timestamp() * 1000)


def test_times_are_stored_in_utc() -> None:
    local = datetime(2025, 3, 1, 11, 30, 15, 123000, tzinfo=timezone(timedelta(hours=2)))
    message = Message(account_id="a", message_id="m", folder_id="f", version=1, received_at=local)
    doc = d.message_to_document(message)
    assert doc["received_at"] == "2025-03-01T09:30:15.123Z"
    assert d.message_from_document(doc).received_at == local


def test_html_body_is_reduced_to_visible_text() -> None:
    html = ("<html><head><title>t</title><style>p {color: red}</style></head><body>"
            "<p>Dear&nbsp;Bob,</p><div>Numbers&amp;facts<br>line two</div>"
            "<script>alert('x')</script><p>Bye</p></body></html>")
    text = d.body_for_index(html, d.BodyPolicy())
    assert text == "Dear Bob,\n\nNumbers&facts\nline two\n\nBye"


def test_plain_text_with_angle_brackets_is_not_treated_as_html() -> None:
    assert d.body_for_index("mail <bob@example.com> if 2 < 3", d.BodyPolicy()) == "mail <bob@example.com> if 2 < 3"


def test_body_policy_caps_or_drops_the_body() -> None:
    assert d.body_for_index("x" * 100, d.BodyPolicy(max_chars=10)) == "x" * 10
    assert d.body_for_index("text", d.BodyPolicy(store=False)) is None
    message = Message(account_id="a", message_id="m", folder_id="f", version=1, body_text="secret")
    assert "body_text" not in d.message_to_document(message, body=d.BodyPolicy(store=False))


def test_lone_surrogates_are_replaced_so_json_encoding_cannot_fail() -> None:
    message = Message(account_id="a", message_id="m", folder_id="f", version=1, subject="caf\udce9",
                      body_text="x\ud800y")
    doc = d.message_to_document(message)
    doc["subject"].encode("utf-8")
    doc["body_text"].encode("utf-8")


@pytest.mark.parametrize("message", [
    Message(account_id="a:b", message_id="m", folder_id="f", version=1),
    Message(account_id="", message_id="m", folder_id="f", version=1),
    Message(account_id="a", message_id="", folder_id="f", version=1),
    Message(account_id="a", message_id="m", folder_id="", version=1),
    Message(account_id="a", message_id="m", folder_id="f", version=-1),
    Message(account_id="a", message_id="m", folder_id="f", version=2**63),
])
def test_messages_the_store_cannot_write_are_input_errors(message: Message) -> None:
    with pytest.raises(InputError):
        d.check_message(message)


def test_folder_update_clears_a_removed_parent_but_keeps_phase_unless_given() -> None:
    doc = d.folder_to_document(Folder("a", "f", "F", parent_id=None))
    assert doc["parent_id"] is None and "phase" not in doc
    assert d.folder_to_document(Folder("a", "f", "F"), phase="resync")["phase"] == "resync"


def test_cursor_round_trip_and_rejection() -> None:
    assert decode_cursor(encode_cursor([1_740_821_415_123, "m1"])) == [1_740_821_415_123, "m1"]
    assert decode_cursor(encode_cursor([2**63 - 1, "m1"])) == [2**63 - 1, "m1"]
    for bad in ("", "!!!", encode_cursor([None, "m1"]), encode_cursor(["1", "m1"]), encode_cursor([1]),
                encode_cursor([2**70, "x"]), encode_cursor([-(2**63) - 1, "x"]), encode_cursor([1, ""]),
                encode_cursor([1, "m" * 1025]), encode_cursor([True, "x"])):
        with pytest.raises(InputError):
            decode_cursor(bad)


def test_index_prefix_must_be_a_valid_index_name() -> None:
    assert IndexNames("mailsync").messages_index == "mailsync-messages-v1"
    for bad in ("", "Upper", "-x", "a b", "a/b", "a*"):
        with pytest.raises(Exception, match="ELASTICSEARCH_INDEX_PREFIX"):
            IndexNames(bad)


@given(st.text(alphabet=st.sampled_from(list("ab é<>\t\n\r\f\v\u00a0\u2003\x85\u2028\x1c\u200b")), max_size=60))
def test_tidy_whitespace_is_the_per_line_regex_definition(text: str) -> None:
    # tidy_whitespace avoids the regex for speed (bench/pipeline.py); it must mean exactly this.
    lines = (d._SPACES.sub(" ", line).strip() for line in text.split("\n"))
    assert d.tidy_whitespace(text) == d._BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
