"""The fast FETCH parser against imapclient's, which stays the reference (mailsync.providers.imap_fetch).

Whatever the fast path returns must be exactly what imapclient returns for
the same imaplib lines — same keys, values, types and time zones — and
anything it does not know for certain must come back as None (the caller
then uses imapclient). Checked on generated answers of every shape the
providers ask for and some they never do, and on a real Dovecot's answers.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient.exceptions import ProtocolError
from imapclient.response_parser import parse_fetch_response

from mailsync.providers import imap_session
from mailsync.providers.imap_fetch import _parse_pairs, _parse_tokens, parse_fetch
from mailsync.providers.imap_session import ImapEndpoint, ImapSession
from tests.fixtures.dovecot import ImapUser, loopback_policy
from tests.providers.imap_harness import seed_messages


def reference(lines: list[Any]) -> dict[int, dict[bytes, Any]]:
    return dict(parse_fetch_response(list(lines), False, False))


def assert_same(fast: dict[int, dict[bytes, Any]], slow: dict[int, dict[bytes, Any]]) -> None:
    assert fast == slow
    for seq, item in slow.items():
        assert list(fast[seq]) == list(item), "same items, in the same order"
        for key, value in item.items():
            assert type(fast[seq][key]) is type(value), (key, value, fast[seq][key])
            if isinstance(value, datetime):
                assert fast[seq][key].utcoffset() == value.utcoffset(), key


# --- generated answers -------------------------------------------------------------------------

# Pieces of one FETCH item: a list of text fragments and literals, in order.
Piece = list[bytes | tuple[bytes]]

FLAG = st.sampled_from([b"\\Seen", b"\\Flagged", b"\\Answered", b"\\Deleted", b"\\Draft", b"\\Recent", b"$Forwarded",
                        b"$label1", b"NonJunk", b"\\*", b"0123", b"7", b"0", b"NIL"])
LITERAL = st.binary(max_size=40).map(lambda b: b + random.Random(len(b)).choice([b"", b")", b"{3}", b"\r\n", b'"']))
DATE = st.one_of(
    st.builds(lambda d, mo, y, h, mi, s, sign, zh, zm: f'"{d}-{mo}-{y} {h:02d}:{mi:02d}:{s:02d} {sign}{zh:02d}{zm:02d}"'
              .encode(), st.sampled_from(["1", " 5", "05", "31", "30"]),
              st.sampled_from(["Jan", "Feb", "jun", "Dec", "Foo"]), st.integers(1970, 2099),
              st.integers(0, 24), st.integers(0, 59), st.integers(0, 60), st.sampled_from(["+", "-"]),
              st.integers(0, 14), st.sampled_from([0, 30, 45])),
    st.just(b"NIL"), st.just(b'"not a date"'))


def item(name: bytes, value: Piece) -> Piece:
    return [name + b" ", *value]


ITEM = st.one_of(
    st.integers(0, 10**9).map(lambda n: item(b"RFC822.SIZE", [str(n).encode()])),
    st.lists(FLAG, max_size=5).map(lambda fs: item(b"FLAGS", [b"(" + b" ".join(fs) + b")"])),
    DATE.map(lambda d: item(b"INTERNALDATE", [d])),
    st.integers(0, 2**63).map(lambda n: item(b"MODSEQ", [f"({n})".encode()])),
    LITERAL.map(lambda b: item(b"BODY[HEADER]", [(b,)])),
    LITERAL.map(lambda b: item(b"BODY[TEXT]<0>", [(b,)])),
    st.just(item(b"BODY[HEADER]", [b"NIL"])),
    st.just(item(b"X-GM-LABELS", [b'("\\\\Inbox" "with space")'])),        # an escape: imapclient's
    st.just(item(b"X-LABEL", [b'"plain quoted"'])),
    st.just(item(b"BODY[HEADER.FIELDS (DATE FROM)]", [(b"Date: x\r\n\r\n",)])),   # a section with spaces
    st.just(item(b"BODYSTRUCTURE", [b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 8 1)'])),
    st.just(item(b"ENVELOPE", [b'(NIL "s" NIL NIL NIL NIL NIL NIL NIL NIL)'])),
    st.just(item(b"x-weird", [b"(1 (2))"])),
)


@st.composite
def answers(draw: st.DrawFn) -> list[Any]:
    """imaplib's lines for a few FETCH responses: text, and (line ending in {n}, literal) around literals."""
    lines: list[Any] = []
    for _ in range(draw(st.integers(1, 4))):
        seq = draw(st.integers(1, 50))
        pieces: Piece = [f"{seq} (".encode()]
        items = draw(st.lists(ITEM, max_size=6))
        if draw(st.booleans()):
            items.insert(draw(st.integers(0, len(items))), item(b"UID", [str(draw(st.integers(1, 10**6))).encode()]))
        for n, parts in enumerate(items):
            if n:
                pieces.append(b" ")
            pieces.extend(parts)
        pieces.append(b")")
        text = b""
        for part in pieces:
            if isinstance(part, tuple):
                lines.append((text + b"{%d}" % len(part[0]), part[0]))
                text = b""
            else:
                text += part
        lines.append(text)
    return [line for line in lines if line != b""]


@settings(max_examples=400, deadline=None)
@given(answers())
def test_the_fast_path_answers_as_imapclient_or_not_at_all(lines: list[Any]) -> None:
    fast = parse_fetch(lines)
    if fast is None:
        return
    assert_same(fast, reference(lines))


@settings(max_examples=400, deadline=None)
@given(answers())
def test_the_pair_path_answers_as_the_token_path_or_not_at_all(lines: list[Any]) -> None:
    # parse_fetch tries the pair path first: where it answers, the token path (held to imapclient
    # above) must answer the same; where it does not, parse_fetch is the token path.
    pairs = _parse_pairs(lines)
    if pairs is None:
        assert parse_fetch(lines) == _parse_tokens(lines)
        return
    tokens = _parse_tokens(lines)
    assert tokens is not None
    assert_same(pairs, tokens)


def test_plain_answers_take_the_fast_path_and_odd_ones_fall_back() -> None:
    plain = [
        (b'1 (UID 7 FLAGS (\\Seen $Forwarded) INTERNALDATE " 5-Jan-2026 08:07:00 +0530" MODSEQ (12) '
         b"BODY[HEADER] {12}", b"Subject: x\r\n"),
        (b" BODY[TEXT]<0> {3}", b"(){"),
        b")",
        b"2 (FLAGS (\\Seen))",    # unsolicited (no UID): merged by sequence number, as imapclient does
        b'2 (UID 8 FLAGS () INTERNALDATE "05-Jan-2026 08:07:00 -0000" BODY[HEADER] NIL)',
    ]
    fast = parse_fetch(plain)
    assert fast is not None
    assert_same(fast, reference(plain))
    assert _parse_pairs(plain) == fast, "the shapes a sync asks for are plain pairs"
    assert fast[1][b"BODY[TEXT]<0>"] == b"(){"
    assert fast[2][b"INTERNALDATE"].utcoffset() == timedelta(0)
    for odd in (
        [b'1 (UID 1 X-GM-LABELS ("\\\\Inbox"))'],
        [b'1 (UID 1 BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 1 1))'],
        [(b"1 (UID 1 BODY[HEADER.FIELDS (DATE)] {2}", b"\r\n"), b")"],
        [(b"1 (UID 1 BODY[HEADER] {5}", b"\r\n"), b")"],     # a literal shorter than announced
        [b'1 (UID 1 INTERNALDATE "31-Feb-2026 08:07:00 +0000")'],
        [b"1 (UID x)"],
        [b"1 (UID 1 FLAGS (" + b"A" * 300 + b"\t))"],   # not all tokens: refused at once (no backtracking)
        [b"1 (UID 1 FLAGS"],
        [None],
    ):
        assert parse_fetch(odd) is None, odd


def test_a_protocol_error_stays_imapclients() -> None:
    lines = [b"1 (UID)"]
    assert parse_fetch(lines) is None
    with pytest.raises(ProtocolError):
        reference(lines)


# --- a real server -----------------------------------------------------------------------------

def test_dovecots_answers_parse_the_same_both_ways(imap_user: ImapUser, monkeypatch: pytest.MonkeyPatch) -> None:
    imap_user.seed_maildir(seed_messages(random.Random(3), {"INBOX": 40, "Archive": 5}))
    seen: list[list[Any]] = []

    def noting(lines: Any) -> Any:
        seen.append(list(lines))
        return parse_fetch(lines)

    monkeypatch.setattr(imap_session, "parse_fetch", noting)
    endpoint = ImapEndpoint(imap_user.host, imap_user.port, "none", imap_user.username)
    session = ImapSession.connect(endpoint, lambda _f: imap_user.password, allow_insecure=True, timeout_s=60,
                                  policy=loopback_policy())
    try:
        session.examine("INBOX", condstore=True)
        fetched = session.uid_fetch("1:*", "UID FLAGS INTERNALDATE MODSEQ BODY.PEEK[HEADER] BODY.PEEK[TEXT]<0.64>")
        session.uid_fetch("1:*", "UID FLAGS")
        session.uid_fetch("1:3", "UID RFC822.SIZE BODYSTRUCTURE")
    finally:
        session.close()
    assert len(fetched) == 40
    assert len(seen) == 3
    for lines in seen[:2]:
        fast = _parse_pairs(lines)
        assert fast is not None, "a plain answer takes the pair path"
        assert_same(fast, reference(lines))
    assert parse_fetch(seen[2]) is None, "BODYSTRUCTURE is imapclient's"
