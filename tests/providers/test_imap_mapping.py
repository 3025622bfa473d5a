"""IMAP mapping, cursors and SASL without a server: odd mail never breaks a page; cursors are opaque and checked.

The same odd messages go through a real Dovecot in test_imap_bad_input.py;
here each rule is pinned down on its own.
"""

from __future__ import annotations

import base64
import email.utils
from datetime import UTC, datetime

import pytest

from mailsync.errors import CursorExpired
from mailsync.models import FlagStatus
from mailsync.providers.imap_cursor import (
    FolderCursor,
    block_bits_for,
    blocks_of,
    changed_blocks,
    decode_folder_cursor,
    decode_list_cursor,
    encode_folder_cursor,
    encode_list_cursor,
    parse_uid_set,
    uid_checksum,
    uid_set,
)
from mailsync.providers.imap_mapping import (
    MAX_ADDRESSES,
    MAX_SUBJECT_CHARS,
    AddressCache,
    categories,
    decode_header_value,
    flags_key,
    has_attachments,
    map_message,
    parse_date,
    parse_header_block,
    preview_of,
)
from mailsync.providers.imap_session import Xoauth2, xoauth2_string


def _map(header_block: bytes, text: bytes | None = b"Hello there.\r\n", flags: tuple[bytes, ...] = ()):  # type: ignore[no-untyped-def]
    return map_message(account_id="acc", folder_id="INBOX", message_id="k.1.1", version=7, flags=flags,
                       internal_date=datetime(2026, 3, 1, 12, 0, tzinfo=UTC), header_block=header_block, text=text,
                       addresses=AddressCache())


# --- RFC 2047 and 8-bit headers ---------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "text"), [
    (b"=?utf-8?q?Caf=C3=A9_cr=C3=A8me?=", "Café crème"),
    (b"=?UTF-8?B?w5xiZXJzaWNodA==?=", "Übersicht"),
    (b"=?iso-8859-1?q?Gr=FC=DFe?= aus =?iso-8859-1?q?K=F6ln?=", "Grüße aus Köln"),
    (b"=?utf-8?q?one?= =?utf-8?q?two?=", "onetwo"),                 # adjacent words join (RFC 2047 6.2)
    (b"=?utf-8?b?5pel5pys6Kqe?=", "日本語"),
    (b"=?x-unknown-charset?q?plain?=", "plain"),                     # unknown charset: best effort
    (b"=?utf-8?b?!!!not base64?=", "=?utf-8?b?!!!not base64?="),     # broken word: kept as it came
    (b"Gr\xfc\xdfe", "Grüße"),                                        # raw 8-bit, not UTF-8: cp1252
    (b"na\xc3\xafve", "naïve"),                                       # raw UTF-8 (RFC 6532)
    (b"=?utf-8?q?cut_off_at_the_en", "cut off at the en"),         # a capped header ends mid-word
])
def test_header_values_decode_without_exceptions(raw: bytes, text: str) -> None:
    assert decode_header_value(raw) == text


def test_header_blocks_unfold_keep_the_first_and_cap_giants() -> None:
    block = (b"Subject: first\r\n line\r\nSubject: second\r\nX-Big: " + b"a" * 100_000 + b"\r\n"
             b"not a header line\r\nFrom: A <a@x>\r\n\r\n")
    headers = parse_header_block(block)
    assert headers[b"subject"] == b"first line"
    assert len(headers[b"x-big"]) <= 16_384
    assert headers[b"from"] == b"A <a@x>"


@pytest.mark.parametrize("block", [
    b"Subject: first\r\n line\r\nSUBJECT: second\r\n\r\n",                 # first wins, any case
    b"Received: from a\r\n\tby b\r\nSubject: s\r\n\tcontinued\r\n",        # an unwanted field's lines skipped
    b"\x0bSubject\t: spaced\r\nFrom : A <a@x>\r\n",                          # what bytes.strip takes off a name
    b" Subject: a continuation first\r\nSub ject: no\r\nX-Subject: no\r\n",  # none of these is Subject
    b"Subject: " + b"a" * 20_000 + b"\r\n " + b"b" * 10 + b"\r\nTo:\r\n",        # capped; an empty value
    b"subject:no space\nfrom:\n continued only\n",                          # bare LF lines
])
def test_wanted_fields_read_as_the_whole_block_reads_them(block: bytes) -> None:
    # The wanted fields are found by one regular expression, not the line loop: same answers.
    wanted = frozenset({b"subject", b"from", b"to"})
    everything = parse_header_block(block)
    assert parse_header_block(block, wanted) == {k: v for k, v in everything.items() if k in wanted}


@pytest.mark.parametrize("raw", [
    b"Sun, 01 Jan 2023 05:52:56 +0200", b"1 Jan 2023 00:00:00 -0000", b"Xyz,31 Dec 1999 23:59:59 +1400",
    b"01 jan 0001 00:00:00 +0000", b"01 Jan 69 00:00:00 +0000", b"01 Jan 0068 12:00:00 -0930",
    b"31 Feb 2023 00:00:00 +0000", b"01 Jan 2023 24:00:00 +0000", b"01 Jan 2023 00:00:00 +9900",
    b"  01 Jan 2023 00:00:00 +0000  ", b"01 Jan 2023 00:00 +0000", b"01 Jan 2023 00:00:00 GMT",
    b"Mon, 2 Feb 2026 10:00:00 +0100 (CET)",
])
def test_dates_read_as_the_stdlib_reads_them(raw: bytes) -> None:
    # The usual RFC 5322 form is read by a regular expression, others by the stdlib: same answers.
    try:
        expected = email.utils.parsedate_to_datetime(raw.decode())
        expected = expected.replace(tzinfo=UTC) if expected.tzinfo is None else expected.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        expected = None
    assert parse_date(raw) == expected


def test_a_message_with_every_odd_header_maps() -> None:
    to = b", ".join(b"=?utf-8?q?N=C3=A4me_" + str(n).encode() + b"?= <n" + str(n).encode() + b"@x.org>"
                    for n in range(500))
    block = (b"Subject: =?utf-8?q?" + b"=C3=A9" * 5000 + b"?=\r\n"
             b"From: broken <<<@@>\r\nTo: " + to + b"\r\nDate: yesterday-ish\r\n"
             b"Message-ID: <id@x>\r\nX-Priority: 1 (Highest)\r\n\r\n")
    message = _map(block)
    assert message.subject == "é" * MAX_SUBJECT_CHARS
    assert len(message.to) == MAX_ADDRESSES and message.to[3].name == "Näme 3"
    assert message.sent_at is None and message.importance == "high"
    assert message.internet_message_id == "<id@x>"


def test_no_headers_at_all_is_an_empty_message_not_an_error() -> None:
    message = _map(b"", text=None)
    assert message.subject == "" and message.sender is None and message.to == () and message.body_preview == ""


def test_flags_map_to_the_store_fields() -> None:
    message = _map(b"Subject: x\r\n\r\n", flags=(b"\\Seen", b"\\Flagged", b"\\Draft", b"$Forwarded", b"Work",
                                                 b"$label1", b"NonJunk"))
    assert message.is_read and message.is_draft and message.flag_status is FlagStatus.FLAGGED
    assert message.categories == ("Work", "$label1")
    assert categories((b"\\Answered",)) == ()
    assert flags_key((b"\\Seen", b"B", b"\\Recent")) == flags_key((b"B", b"\\SEEN"))


def test_dates_are_utc_and_received_is_the_internal_date() -> None:
    message = _map(b"Date: Tue, 3 Mar 2026 10:00:00 +0200\r\n\r\n")
    assert message.sent_at == datetime(2026, 3, 3, 8, 0, tzinfo=UTC)
    assert message.received_at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- previews -------------------------------------------------------------------------------------

MULTIPART = (b"--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
             b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>HTML <b>only</b> &amp; more</p>\r\n"
             b"--inner\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable"
             b"\r\n\r\nPlain text: caf=E9 =\r\ncontinued\r\n--inner--\r\n--outer\r\nContent-Type: application/pdf\r\n"
             b"Content-Disposition: attachment\r\n\r\nJVBERi0=\r\n--outer--\r\n")


def test_preview_prefers_the_first_text_plain_part_in_nested_multiparts() -> None:
    headers = {b"content-type": b'multipart/mixed; boundary="outer"'}
    assert preview_of(MULTIPART, headers) == "Plain text: café continued"
    assert has_attachments(headers)


def test_preview_falls_back_to_html_and_decodes_base64_cut_anywhere() -> None:
    html_only = (b"--b\r\nContent-Type: text/html\r\n\r\n<style>p{}</style><p>Hi&nbsp;there</p>\r\n--b--\r\n")
    assert preview_of(html_only, {b"content-type": b"multipart/alternative; boundary=b"}) == "Hi there"
    encoded = base64.b64encode("Grüße aus Berlin, ".encode() * 40)
    cut = encoded[:301]   # a partial fetch ends anywhere
    text = preview_of(cut, {b"content-type": b"text/plain; charset=utf-8", b"content-transfer-encoding": b"base64"})
    assert text.startswith("Grüße aus Berlin, Grüße") and len(text) <= 255
    assert preview_of(b"\x00\xff binary", {b"content-type": b"image/png"}) == ""
    assert not has_attachments({b"content-type": b"multipart/alternative; boundary=x"})


@pytest.mark.parametrize("body", [
    b"word " * 400,                                   # plenty of text: the first 510 characters suffice
    b"x" * 300 + b" tail",                            # one long word across the first window's end
    b"a" + b" " * 600 + b"b " * 300,                  # a whitespace run: the short window collapses short
    b"\r\n\r\n  " + b"\t\r\n".join([b"line"] * 120),  # leading blank lines, tabs, CRLFs
    b"short text",
    b"caf\xc3\xa9 " * 150 + b"\xe2\x80\x83end",          # non-ASCII letters and a Unicode space
])
def test_a_preview_reads_as_the_whole_window_collapsed(body: bytes) -> None:
    # preview_of splits only the first 2 x PREVIEW_CHARS characters into words when that is enough:
    # the answer must be that of the whole 8 x PREVIEW_CHARS window, collapsed, then cut.
    from mailsync.providers.imap_mapping import PREVIEW_CHARS

    text = body.decode("utf-8")
    assert preview_of(body, {b"content-type": b"text/plain; charset=utf-8"}) == \
        " ".join(text[: PREVIEW_CHARS * 8].split())[:PREVIEW_CHARS]


def test_preview_of_a_boundary_that_never_comes_is_empty() -> None:
    assert preview_of(b"just text without the boundary", {b"content-type": b"multipart/mixed; boundary=zz"}) == ""


# --- cursors ------------------------------------------------------------------------------------------

def test_folder_cursors_round_trip_and_stay_small() -> None:
    bits = block_bits_for(1_000_000)
    blocks = blocks_of(bits, ((uid, uid_checksum(uid, b"\\seen")) for uid in range(1, 1_000_000, 3)))
    cursor = FolderCursor(uidvalidity=42, mode="f", stage="walk", below=17, modseq=0, uidnext=999_999,
                          target_modseq=3, target_uidnext=1_000_000, count=333_333, block_bits=bits, blocks=blocks,
                          floor=1234, pending=(1, 2))
    encoded = encode_folder_cursor(cursor)
    assert decode_folder_cursor(encoded) == cursor
    assert len(blocks) <= 512 and len(encoded) < 16_000, "a million-message folder still fits a table property"


@pytest.mark.parametrize("bad", ["", "i1.", "i1.!!!", "g1.abc", "i1." + base64.urlsafe_b64encode(b"x").decode(),
                                 encode_list_cursor({"INBOX": "1"})])
def test_unreadable_cursors_are_cursor_expired(bad: str) -> None:
    with pytest.raises(CursorExpired):
        decode_folder_cursor(bad)


def test_list_cursors_round_trip_and_are_checked() -> None:
    assert decode_list_cursor(encode_list_cursor({"INBOX": "ab", "Sent": "cd"})) == {"INBOX": "ab", "Sent": "cd"}
    with pytest.raises(CursorExpired):
        decode_list_cursor("il1.garbage")


def test_block_checksums_do_not_depend_on_order_or_paging_and_see_one_flag() -> None:
    items = [(uid, uid_checksum(uid, b"")) for uid in range(1, 2000)]
    whole = blocks_of(8, items)
    assert blocks_of(8, reversed(items)) == whole
    changed = [(u, uid_checksum(u, b"\\seen" if u == 700 else b"")) for u, _ in items]
    assert changed_blocks(whole, blocks_of(8, changed)) == [700 >> 8]
    assert changed_blocks(whole, blocks_of(8, items[:-1])) == [1999 >> 8]


def test_uid_sets() -> None:
    assert uid_set([5, 1, 2, 3, 9, 10]) == "1:3,5,9:10"
    assert parse_uid_set("1:3,5,9:*", upper=12) == [1, 2, 3, 5, 9, 10, 11]
    assert parse_uid_set("7:4", upper=100) == [4, 5, 6, 7]
    assert parse_uid_set("1:1000000000", upper=4) == [1, 2, 3], "ranges are clipped to what could exist"


# --- SASL XOAUTH2 -------------------------------------------------------------------------------------------

def test_xoauth2_initial_response_is_the_documented_string() -> None:
    # https://developers.google.com/gmail/imap/xoauth2-protocol: "user=" {User} "^Aauth=Bearer " {Token} "^A^A"
    assert xoauth2_string("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg") == (
        "user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")
    mech = Xoauth2("u@example.com", "tok")
    assert mech(b"") == b"user=u@example.com\x01auth=Bearer tok\x01\x01"
    # After a refusal the server sends a JSON error challenge and expects an empty answer.
    assert mech(b'{"status":"401","schemes":"bearer"}') == b""


@pytest.mark.parametrize("raw", [
    '"Yolanda Green" <yolanda.green@mail.test>', "J. Smith <j.smith@example.com>", "plain@example.com",
    "  <only@angle.example>  ", '"Doe, John" <john@example.com>', "a@x.org, b@y.org", 'Group: a@x.org, b@y.org;',
    '"Quoted \\"inner\\"" <q@x.org>', "Name (comment) <c@x.org>", "=?utf-8?q?J=C3=B6rg?= <j@x.de>",
])
def test_the_fast_address_path_agrees_with_the_rfc_5322_parser(raw: str) -> None:
    import email.utils

    from mailsync.providers.imap_mapping import parse_addresses

    expected = [(decode_header_value(name.encode()), address) for name, address in email.utils.getaddresses([raw])
                if name or address]
    assert [(a.name, a.address) for a in parse_addresses(raw.encode())] == expected


def test_a_gmail_like_folder_list_skips_virtual_folders_and_keeps_roles() -> None:
    from mailsync.providers.imap import folders_from_list
    from mailsync.providers.imap_session import MailboxEntry

    def entry(name: str, *flags: str) -> MailboxEntry:
        return MailboxEntry(name=name, delimiter="/", flags=frozenset(f.lower() for f in flags), messages=1, unseen=0)

    folders = {f.folder_id: f for f in folders_from_list("acc", [
        entry("INBOX", "\\HasNoChildren"), entry("[Gmail]", "\\Noselect", "\\HasChildren"),
        entry("[Gmail]/All Mail", "\\All"), entry("[Gmail]/Starred", "\\Flagged"),
        entry("[Gmail]/Important", "\\Important"), entry("[Gmail]/Sent Mail", "\\Sent"),
        entry("[Gmail]/Spam", "\\Junk"), entry("[Gmail]/Trash", "\\Trash"), entry("[Gmail]/Drafts", "\\Drafts"),
        entry("Work"), entry("Work/2026"), entry("Sent"),   # a user folder named like a role: not the role
    ])}
    assert set(folders) == {"INBOX", "[Gmail]/Sent Mail", "[Gmail]/Spam", "[Gmail]/Trash", "[Gmail]/Drafts",
                            "Work", "Work/2026", "Sent"}
    assert {f.role for f in folders.values() if f.role} == {"inbox", "sentitems", "junkemail", "deleteditems",
                                                            "drafts"}
    assert folders["Sent"].role is None, "SPECIAL-USE decides when the server has it"
    assert folders["[Gmail]/Sent Mail"].parent_id is None and folders["[Gmail]/Sent Mail"].name == "Sent Mail"
    assert folders["Work/2026"].parent_id == "Work" and folders["Work"].child_folder_count == 1
