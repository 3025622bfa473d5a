"""FETCH responses parsed fast, with imapclient's parser as the reference and the fallback.

Why: an initial sync FETCHes every message once (UID, FLAGS, INTERNALDATE,
MODSEQ and two literals: the header block and the first bytes of the
text), and imapclient's parser walks those responses byte by byte in
Python — its lexer was ~45 % of the syncing process's CPU on the 20,000
message bench mailbox (bench/imap_initial_sync.py --profile), more than
the store client, the mapping and the engine together.

:func:`parse_fetch` reads the common shapes with one compiled regular
expression per text piece and returns exactly what
``imapclient.response_parser.parse_fetch_response(lines, False, False)``
returns for them (tests/providers/test_imap_fetch.py holds it to that on
generated and real Dovecot answers). Anything it does not know for certain
— a nested list (BODYSTRUCTURE, ENVELOPE), a quoted string with an escape,
a section with spaces (``BODY[HEADER.FIELDS (...)]``), a literal where it
does not expect one, an INTERNALDATE it cannot read — makes it return
None, and the caller parses the whole answer with imapclient as before.
So this never decides anything imapclient would have decided differently;
it only skips the slow walk when the answer is plain.

The input is imaplib's: a list whose items are ``bytes`` (a line, or the
rest of one after a literal) or ``(line ending in {n}, literal bytes)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

# One token: "(", ")", a quoted string without escapes, a literal's announcement at the end of a
# line, or an atom (keys such as BODY[TEXT]<0>, numbers, NIL, flags such as \Seen or $Label).
_TOKEN_RE = rb'[ ]*(?:(\()|(\))|"([^"\\\r\n]*)"|\{(\d+)\}$|([^ \t()"{\r\n]+))'
_TOKEN = re.compile(_TOKEN_RE)
# Atomic tokens: without (?>...) a line that is *not* all tokens would be retried with every split of
# its atoms into shorter atoms, exponential in their length.
# (No capturing groups inside: 3.11's re mishandles them in an atomic group.)
_LINE = re.compile(rb'(?>[ ]*+(?:\(|\)|"[^"\\\r\n]*+"|\{\d+\}$|[^ \t()"{\r\n]++))*+[ ]*+')
_MONTHS = {m: n for n, m in enumerate(
    (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC"), start=1)}
# RFC 3501 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (the day may be space-padded).
_INTERNALDATE = re.compile(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})")
# Values imapclient gives a structure of its own (BodyData, Envelope): left to it.
_STRUCTURED = frozenset({b"BODY", b"BODYSTRUCTURE", b"ENVELOPE"})

_LP, _RP, _STR, _LIT, _ATOM = range(5)
_OPEN, _CLOSE = (_LP, None), (_RP, None)


class _NotPlain(Exception):
    """The answer has a shape this parser leaves to imapclient."""


def parse_fetch(lines: Sequence[Any]) -> dict[int, dict[bytes, Any]] | None:
    """imaplib's FETCH lines → ``{seq: {b"SEQ": seq, item: value}}`` like imapclient, or None to fall back.

    Responses for the same sequence number are merged, later items
    winning, as imapclient does.
    """
    found = _parse_pairs(lines)
    return found if found is not None else _parse_tokens(lines)


# The pair path: what a sync's FETCH answers are made of, ``KEY value`` pairs whose value is an
# atom, a quoted string without escapes, a flat list of atoms, or a literal, read one line at a
# time by one findall (each pair's groups come back as one tuple) instead of token by token:
# ~20 -> ~13 us per message on the bench mailbox (with by_uid). Tokens as ``_TOKEN`` reads them,
# but stricter (one space between a key and its value; nothing nested). Whatever it does not
# accept — or accepts only in part — goes to the token path below, which answers the same where
# both answer (tests/providers/test_imap_fetch.py holds them to each other and to imapclient).
_ATOM_RE = rb'[^ \t()"{\r\n]++'
_QUOTED_RE = rb'"[^"\\\r\n]*+"'
_FLAT_RE = rb'\((?>[ ]*+' + _ATOM_RE + rb')*+[ ]*+\)'
# One pair, its value's kind told by which group is not empty (quotes and parentheses are kept in
# theirs, so "" and () are not empty). Run only on a line _PAIRS accepted whole.
_PAIR = re.compile(rb'[ ]*+(' + _ATOM_RE + rb') (?:(' + _QUOTED_RE + rb')|(' + _FLAT_RE + rb')|\{(\d+)\}$|('
                   + _ATOM_RE + rb'))')
# A line that is pairs and nothing else. Atomic and possessive throughout (no capturing groups
# inside them: 3.11's re mishandles those), so a line that is not pairs fails in linear time.
_PAIRS = re.compile(rb'(?>[ ]*+' + _ATOM_RE + rb' (?>' + _QUOTED_RE + rb'|' + _FLAT_RE + rb'|\{\d+\}$|'
                    + _ATOM_RE + rb'))*+[ ]*+')
_RESPONSE_START = re.compile(rb'(\d+) \(')


def _parse_pairs(lines: Sequence[Any]) -> dict[int, dict[bytes, Any]] | None:
    """The pair path (see above): the whole answer, or None when any line is not plain pairs."""
    found: dict[int, dict[bytes, Any]] = {}
    item: dict[bytes, Any] | None = None
    seq = 0
    try:
        for line in lines:
            if isinstance(line, tuple):
                if len(line) != 2 or not isinstance(line[0], bytes) or not isinstance(line[1], bytes):
                    return None
                text, literal = line
            elif isinstance(line, bytes):
                text, literal = line, None
            else:
                return None
            if item is None:   # a response begins: "<seq> ("
                start = _RESPONSE_START.match(text)
                if start is None:
                    return None
                seq = int(start.group(1))
                item = {b"SEQ": seq}
                text = text[start.end():]
            # Only a literal carries a response over a line break: a line without one ends it.
            ends = literal is None
            if ends:
                if not text.endswith(b")"):
                    return None
                text = text[:-1]
            if _PAIRS.fullmatch(text) is None:
                return None
            pairs = _PAIR.findall(text)
            for key, quoted, flat, size, atom in pairs:
                value: Any
                if size:   # _PAIRS put it last on the line
                    if literal is None or int(size) != len(literal):
                        return None
                    value, literal = literal, None
                elif quoted:
                    value = quoted[1:-1]
                elif flat:
                    members = [m for m in flat[1:-1].split(b" ") if m]
                    if not all(map(_whole_section, members)):
                        return None
                    value = tuple([_atom(m) for m in members])
                else:
                    if not _whole_section(atom):
                        return None
                    value = _atom(atom)
                if not _whole_section(key):
                    return None
                _put(item, key.upper(), value)
            if literal is not None:
                return None   # the line did not end with the literal's announcement
            if ends:
                found.setdefault(seq, {}).update(item)
                item = None
        return found if item is None else None
    except _NotPlain:
        return None


def _whole_section(atom: bytes) -> bool:
    """False for an atom that is part of a section with spaces or parentheses inside (``BODY[HEADER.FIELDS``)."""
    return b"[" not in atom or atom.endswith((b"]", b">"))


def _parse_tokens(lines: Sequence[Any]) -> dict[int, dict[bytes, Any]] | None:
    """The token path: any answer of tokens and non-nested lists, or None to fall back to imapclient."""
    try:
        tokens = _tokens(lines)
        found: dict[int, dict[bytes, Any]] = {}
        position = 0
        count = len(tokens)
        while position < count:
            seq = _number(tokens[position])
            if position + 1 >= count or tokens[position + 1][0] != _LP:
                raise _NotPlain()
            position += 2
            item: dict[bytes, Any] = {b"SEQ": seq}
            while True:
                if position >= count:
                    raise _NotPlain()
                kind, key = tokens[position]
                if kind == _RP:
                    position += 1
                    break
                if kind != _ATOM or position + 1 >= count:
                    raise _NotPlain()
                value, position = _value(tokens, position + 1)
                _put(item, key.upper(), value)
            found.setdefault(seq, {}).update(item)
        return found
    except _NotPlain:
        return None


def _tokens(lines: Sequence[Any]) -> list[tuple[int, Any]]:
    tokens: list[tuple[int, Any]] = []
    append = tokens.append
    for line in lines:
        if isinstance(line, tuple):
            if len(line) != 2 or not isinstance(line[0], bytes) or not isinstance(line[1], bytes):
                raise _NotPlain()
            text, literal = line
        elif isinstance(line, bytes):
            text, literal = line, None
        else:
            raise _NotPlain()
        # One pass in C checks that the whole line is tokens (findall alone would skip what is not).
        if _LINE.fullmatch(text) is None:
            raise _NotPlain()
        announced = None
        for lp, rp, quoted, size, atom in _TOKEN.findall(text):
            if lp:
                append(_OPEN)
            elif rp:
                append(_CLOSE)
            elif size:
                announced = int(size)
            elif atom:
                if b"[" in atom and not atom.endswith((b"]", b">")):
                    raise _NotPlain()   # a section with spaces or parentheses inside
                append((_ATOM, atom))
            else:
                append((_STR, quoted))   # "" is an empty quoted string: every other group matched nothing
        if (announced is None) != (literal is None) or (literal is not None and len(literal) != announced):
            raise _NotPlain()
        if literal is not None:
            append((_LIT, literal))
    return tokens


def _number(token: tuple[int, Any]) -> int:
    kind, value = token
    if kind != _ATOM or not value.isdigit():
        raise _NotPlain()
    return int(value)


def _atom(value: bytes) -> Any:
    """imapclient's reading of a bare atom: NIL, a number (not one with a leading zero), else the bytes."""
    if value == b"NIL":
        return None
    if value.isdigit() and (value[:1] != b"0" or len(value) == 1):
        return int(value)
    return value


def _value(tokens: list[tuple[int, Any]], position: int) -> tuple[Any, int]:
    kind, value = tokens[position]
    if kind == _ATOM:
        return _atom(value), position + 1
    if kind in (_STR, _LIT):
        return value, position + 1
    if kind != _LP:
        raise _NotPlain()
    items: list[Any] = []
    position += 1
    while position < len(tokens):
        kind, value = tokens[position]
        position += 1
        if kind == _RP:
            return tuple(items), position
        if kind == _ATOM:
            items.append(_atom(value))
        elif kind in (_STR, _LIT):
            items.append(value)
        else:
            raise _NotPlain()   # nested lists: BODYSTRUCTURE, ENVELOPE, ...
    raise _NotPlain()


def _put(item: dict[bytes, Any], key: bytes, value: Any) -> None:
    if key in _STRUCTURED:
        raise _NotPlain()
    if key == b"UID":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _NotPlain()
        item[key] = value
    elif key == b"INTERNALDATE":
        item[key] = None if value is None else _internaldate(value)
    else:
        item[key] = value


def _internaldate(value: Any) -> datetime:
    """INTERNALDATE as imapclient gives it with normalise_times off: tz-aware, in the server's offset."""
    if not isinstance(value, bytes):
        raise _NotPlain()
    match = _INTERNALDATE.fullmatch(value)
    month = _MONTHS.get(match.group(2).upper()) if match else None
    if match is None or month is None:
        raise _NotPlain()
    day, _, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
    offset = int(zone_h) * 60 + int(zone_m)
    # parsedate_tz (imapclient's reader) gives "-0000" an offset of 0 too, not an unknown zone.
    zone = timezone(timedelta(minutes=-offset if sign == b"-" else offset))
    try:
        return datetime(int(year), month, int(day), int(hour), int(minute), int(second), tzinfo=zone)
    except ValueError as exc:
        raise _NotPlain() from exc
