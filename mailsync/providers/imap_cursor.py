"""The IMAP provider's cursors: what it remembers between two calls, opaque to everyone else.

A folder cursor is a small versioned JSON document, zlib-compressed and
base64url-encoded behind the prefix ``i1.``; the folder-list cursor is the
same behind ``il1.``. Anything that does not decode to a well-formed
cursor raises ``CursorExpired`` (the engine then restarts the folder, which
is always safe). Nothing in a cursor grows with the number of messages
beyond ``blocks`` (at most ``MAX_BLOCKS`` entries), so a cursor stays a few
kilobytes even for a folder of a million messages — it is saved in a
table row after every page.

Fields of a folder cursor (``FolderCursor``):

* ``uidvalidity`` — the folder's UIDVALIDITY; a different one at the
  server means every UID we hold is void: ``CursorExpired``.
* ``mode`` — how changes are found: ``q`` QRESYNC, ``c`` CONDSTORE,
  ``f`` full FLAGS scan (chosen at the start of a full round from the
  server's capabilities, kept for the cursor's life).
* ``stage`` — ``walk`` (the initial pass, newest first: UIDs below ``below``
  remain), ``sync`` (caught up to the baseline), ``drain`` (an incremental
  round with more changes than one page: changed UIDs below ``below``
  remain, then the baseline becomes ``target_*``).
* ``modseq``/``uidnext`` — the baseline: changes after HIGHESTMODSEQ
  ``modseq`` and UIDs from ``uidnext`` on belong to the next round.
* ``count``/``blocks``/``block_bits`` — modes ``c`` and ``f``: how many
  messages we hold, and per block of ``2**block_bits`` UIDs an
  order-independent checksum of its UIDs (``c``) or UIDs and flags
  (``f``). A block whose checksum moved is where expunges (and, for
  ``f``, flag changes) happened.
* ``floor`` — mode ``f``: the last version handed out; versions there are
  ``max(now in ms, floor + 1)`` so they only grow along the cursor.
* ``pending`` — mode ``f`` while draining: the blocks still to re-read.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from mailsync.errors import CursorExpired

FOLDER_PREFIX = "i1."
LIST_PREFIX = "il1."
MAX_BLOCKS = 512
MODES = ("q", "c", "f")
STAGES = ("walk", "sync", "drain")
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class FolderCursor:
    """One folder's position (see the module docstring)."""

    uidvalidity: int
    mode: str
    stage: str
    below: int = 0
    modseq: int = 0
    uidnext: int = 1
    target_modseq: int = 0
    target_uidnext: int = 1
    count: int = 0
    block_bits: int = 8
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)   # block -> (messages, checksum)
    floor: int = 0
    pending: tuple[int, ...] = ()

    def with_(self, **changes: Any) -> FolderCursor:
        return replace(self, **changes)


def block_bits_for(uidnext: int) -> int:
    """Blocks of at least 256 UIDs, and few enough that a cursor stays small (≤ MAX_BLOCKS)."""
    bits = 8
    while (max(uidnext, 1) >> bits) >= MAX_BLOCKS:
        bits += 1
    return bits


def uid_checksum(uid: int, flags_key: bytes | None = None) -> int:
    """A message's share of its block checksum (UID alone, or UID and canonical flags)."""
    data = uid.to_bytes(8, "little")
    if flags_key is not None:
        data += flags_key
    return zlib.crc32(data)


def add_to_blocks(blocks: dict[int, tuple[int, int]], bits: int, uid: int, checksum: int) -> None:
    """Add one message to the block sums (in place). Sums commute: any order, any split, same result."""
    key = uid >> bits
    count, total = blocks.get(key, (0, 0))
    blocks[key] = (count + 1, (total + checksum) & _MASK)


def blocks_of(bits: int, items: Iterable[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Block sums of ``(uid, checksum)`` pairs."""
    blocks: dict[int, tuple[int, int]] = {}
    for uid, checksum in items:
        add_to_blocks(blocks, bits, uid, checksum)
    return blocks


def changed_blocks(old: Mapping[int, tuple[int, int]], new: Mapping[int, tuple[int, int]]) -> list[int]:
    """Blocks whose membership or checksum differ, in ascending order."""
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


# --- encoding ----------------------------------------------------------------------------

def _pack(prefix: str, body: dict[str, Any]) -> str:
    raw = zlib.compress(orjson.dumps(body), 6)
    return prefix + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unpack(prefix: str, cursor: str, what: str) -> dict[str, Any]:
    if not isinstance(cursor, str) or not cursor.startswith(prefix):
        raise CursorExpired(f"{what} cursor is not an IMAP cursor")
    payload = cursor[len(prefix):]
    try:
        body = orjson.loads(zlib.decompress(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise CursorExpired(f"{what} cursor cannot be decoded") from exc
    if not isinstance(body, dict):
        raise CursorExpired(f"{what} cursor is not an object")
    return body


def encode_folder_cursor(cursor: FolderCursor) -> str:
    body: dict[str, Any] = {"v": cursor.uidvalidity, "m": cursor.mode, "s": cursor.stage, "b": cursor.below,
                            "q": cursor.modseq, "n": cursor.uidnext}
    if cursor.stage != "sync":   # walk and drain end on this baseline
        body["tq"], body["tn"] = cursor.target_modseq, cursor.target_uidnext
    if cursor.mode != "q":
        body["c"], body["k"] = cursor.count, cursor.block_bits
        body["bl"] = [[key, n, total] for key, (n, total) in sorted(cursor.blocks.items())]
    if cursor.mode == "f":
        body["f"] = cursor.floor
        if cursor.pending:
            body["p"] = list(cursor.pending)
    return _pack(FOLDER_PREFIX, body)


def _int(body: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CursorExpired(f"folder cursor field {key!r} is not a non-negative integer")
    return value


def decode_folder_cursor(cursor: str) -> FolderCursor:
    body = _unpack(FOLDER_PREFIX, cursor, "folder")
    mode, stage = body.get("m"), body.get("s")
    if mode not in MODES or stage not in STAGES:
        raise CursorExpired("folder cursor has an unknown mode or stage")
    blocks: dict[int, tuple[int, int]] = {}
    bits = 8
    if mode != "q":
        bits = _int(body, "k", 8)
        rows = body.get("bl") or []
        if not isinstance(rows, list) or len(rows) > 4 * MAX_BLOCKS or not 0 < bits < 40:
            raise CursorExpired("folder cursor has bad blocks")
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3 and all(isinstance(x, int) for x in row)):
                raise CursorExpired("folder cursor has a bad block")
            blocks[row[0]] = (row[1], row[2])
    pending = body.get("p") or []
    if not isinstance(pending, list) or not all(isinstance(x, int) for x in pending):
        raise CursorExpired("folder cursor has bad pending blocks")
    return FolderCursor(
        uidvalidity=_int(body, "v"), mode=mode, stage=stage, below=_int(body, "b", 0),
        modseq=_int(body, "q", 0), uidnext=_int(body, "n", 1),
        target_modseq=_int(body, "tq", 0), target_uidnext=_int(body, "tn", 1),
        count=_int(body, "c", 0), block_bits=bits, blocks=blocks, floor=_int(body, "f", 0),
        pending=tuple(pending),
    )


def encode_list_cursor(digests: Mapping[str, str]) -> str:
    """The folder-list cursor: each folder id with a digest of what we last reported for it."""
    return _pack(LIST_PREFIX, {"f": dict(sorted(digests.items()))})


def decode_list_cursor(cursor: str) -> dict[str, str]:
    body = _unpack(LIST_PREFIX, cursor, "folder list")
    folders = body.get("f")
    if not isinstance(folders, dict) or not all(isinstance(v, str) for v in folders.values()):
        raise CursorExpired("folder list cursor has no folder map")
    return {str(k): v for k, v in folders.items()}


# --- UID sets ------------------------------------------------------------------------------------

def uid_set(uids: Iterable[int]) -> str:
    """Sorted UIDs as an IMAP sequence set with ranges (``1:4,7,9:12``)."""
    ordered = sorted(set(uids))
    if not ordered:
        return ""
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev > start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev > start else str(start))
    return ",".join(parts)


def parse_uid_set(text: str, *, upper: int) -> list[int]:
    """An IMAP sequence set (as VANISHED sends it) as UIDs, ``*`` and ranges clipped below ``upper``."""
    found: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, _, last = part.partition(":")
        try:
            lo = upper - 1 if first == "*" else int(first)
            hi = lo if not last else (upper - 1 if last == "*" else int(last))
        except ValueError:
            continue
        lo, hi = min(lo, hi), max(lo, hi)
        found.extend(range(max(lo, 1), min(hi, upper - 1) + 1))
    return found
