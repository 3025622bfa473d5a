"""Delta query: the change index behind it and its opaque state tokens.

How a folder remembers changes
------------------------------
Every mailbox has one change counter ``seq`` that grows by one on every
change. Each folder keeps a :class:`ChangeIndex`: the messages now in it
(``live``, keyed by the message's REST id, which is new every time a
message enters a folder) and tombstones for those that left (``tombs``),
each stamped with the ``seq`` of its last change. Beside them, two
parallel arrays list ``(seq, key)`` in append order, i.e. sorted by seq.
A change appends a new pair; the old pair for the same key becomes stale
and is skipped when read (its seq no longer matches). When stale pairs
outnumber current ones the arrays are rebuilt, so the index stays O(size)
and appending stays O(1).

A round of delta::

      first request (no token)          S = 0 (or the deltatoken's S)
        U := mailbox.seq                 upper bound, fixed for the round
        page = entries with S < seq <= U, after cursor C, up to N
        more left? -> nextLink  (skiptoken: S, U, C = last seq read)
        none left? -> deltaLink (deltatoken: S' = U)

Finding the cursor is a bisect in the seq array, so a page costs
O(page + stale pairs skipped), never O(folder). Anything that changes
while a client pages gets a seq above U: it is not in this round and is
the first thing the next round returns. Nothing is lost; a message that
changed before the cursor reached it shows up one round later. In the
initial round (S = 0) tombstones are skipped: there is nothing to remove.

Tokens
------
A token is base64url(JSON fields, XORed with a keystream) + "." + HMAC:
opaque to clients, unforgeable, and stateless for the server. It names the mailbox epoch
(a reset or an admin "invalidate" bumps it: 410 ``resyncRequired``) and
the time it was issued (older than ``delta_token_ttl_s``, or older than
the folder's pruned tombstones: 410 ``SyncStateNotFound``, Outlook's code
and message).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson


class HasSeq(Protocol):
    seq: int


@dataclass(slots=True)
class Tombstone:
    """A message (or folder) that left: the ids a client may know it by."""

    key: str            # REST id it had in that folder (folder id for folders)
    immutable_id: str
    seq: int
    at_ms: int


T = TypeVar("T", bound=HasSeq)


class ChangeIndex(Generic[T]):
    """Live items and tombstones of one collection, ordered by last change."""

    __slots__ = ("_keys", "_seqs", "live", "pruned_through", "tombs")

    def __init__(self) -> None:
        self.live: dict[str, T] = {}
        self.tombs: dict[str, Tombstone] = {}
        self._seqs: list[int] = []
        self._keys: list[str] = []
        self.pruned_through = 0   # tombstones at or below this seq are forgotten

    def __len__(self) -> int:
        return len(self.live)

    def put(self, key: str, item: T) -> None:
        """Record ``item`` (already stamped with its new seq) as current."""
        self.tombs.pop(key, None)
        self.live[key] = item
        self._append(item.seq, key)

    def touch(self, key: str) -> None:
        """Record that the live item under ``key`` changed (its seq is new)."""
        self._append(self.live[key].seq, key)

    def remove(self, key: str, tomb: Tombstone | None) -> T | None:
        """Drop ``key``; leave ``tomb`` so delta can report the removal."""
        item = self.live.pop(key, None)
        if tomb is not None:
            self.tombs[tomb.key] = tomb
            self._append(tomb.seq, tomb.key)
        return item

    def prune_tombstones(self, older_than_ms: int) -> None:
        """Forget tombstones older than the horizon (tokens before them get 410)."""
        # tombs is in insertion order == seq order: stop at the first young one.
        while self.tombs:
            key, tomb = next(iter(self.tombs.items()))
            if tomb.at_ms >= older_than_ms:
                break
            del self.tombs[key]
            self.pruned_through = max(self.pruned_through, tomb.seq)

    def scan(self, after: int, upto: int) -> Iterator[tuple[int, T | Tombstone]]:
        """Current entries with after < seq <= upto, in seq order."""
        seqs, keys, live, tombs = self._seqs, self._keys, self.live, self.tombs
        i = bisect.bisect_right(seqs, after)
        n = len(seqs)
        while i < n:
            seq = seqs[i]
            if seq > upto:
                return
            key = keys[i]
            i += 1
            item: Any = live.get(key)
            if item is None:
                item = tombs.get(key)
                if item is None:
                    continue
            if item.seq == seq:
                yield seq, item

    def _append(self, seq: int, key: str) -> None:
        self._seqs.append(seq)
        self._keys.append(key)
        if len(self._seqs) > 2 * (len(self.live) + len(self.tombs)) + 1024:
            self._compact()

    def _compact(self) -> None:
        entries = [(item.seq, key) for key, item in self.live.items()]
        entries += [(tomb.seq, key) for key, tomb in self.tombs.items()]
        entries.sort()
        self._seqs = [s for s, _ in entries]
        self._keys = [k for _, k in entries]


# -- tokens ----------------------------------------------------------------

SKIP = "s"    # $skiptoken: inside a round
DELTA = "d"   # $deltatoken: the start of the next round


@dataclass(frozen=True)
class DeltaToken:
    """What a delta link carries. Opaque to clients (see module docstring)."""

    kind: str                 # SKIP or DELTA
    user_id: str
    folder_id: str            # "" for mailFolders/delta
    epoch: int                # mailbox sync epoch when issued
    since: int                # S: changes after this seq
    upto: int                 # U: round bound (SKIP only)
    cursor: Any               # C: last seq read; [received_ms, serial] in a newest-first round
    issued_ms: int
    select: tuple[str, ...] | None = None
    change_type: str | None = None
    received_filter: tuple[str, str] | None = None   # ("ge"|"gt", iso instant)
    newest_first: bool = False                         # $orderby=receivedDateTime desc (initial round)
    top: int | None = None                             # $top: items per round at most (see mail_api)
    top_left: int | None = None                        # what this round may still return
    generation: int = 0                                # of the folder's sync state (sync_states.TokenCache)
    immutable: bool | None = None                      # issued under Prefer: IdType="ImmutableId"?


class BadToken(ValueError):
    """A token that was not made by this sandbox (tampered, truncated)."""


def encode_token(token: DeltaToken, key: bytes) -> str:
    body = orjson.dumps([
        token.kind, token.user_id, token.folder_id, token.epoch, token.since, token.upto,
        token.cursor, token.issued_ms, token.select, token.change_type, token.received_filter,
        token.newest_first, [token.top, token.top_left], token.generation, token.immutable,
    ])
    mac = hmac.new(key, body, hashlib.sha256).digest()[:12]
    return _b64(_xor(body, key, mac)) + "." + _b64(mac)


def decode_token(text: str, key: bytes) -> DeltaToken:
    try:
        body_text, mac_text = text.split(".")
        mac = _unb64(mac_text)
        body = _xor(_unb64(body_text), key, mac)
    except ValueError as exc:
        raise BadToken("malformed state token") from exc
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()[:12]):
        raise BadToken("state token was not issued by this sandbox")
    try:
        fields = orjson.loads(body)
        (kind, user_id, folder_id, epoch, since, upto, cursor, issued_ms,
         select, change_type, received, newest_first) = fields[:12]
        top, top_left = fields[12] if len(fields) > 12 else (None, None)
        # Tokens from before generations were counted: uncached, either IdType.
        generation, immutable = fields[13:15] if len(fields) >= 15 else (0, None)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise BadToken("malformed state token") from exc
    return DeltaToken(kind, user_id, folder_id, epoch, since, upto, cursor, issued_ms,
                      tuple(select) if select is not None else None, change_type,
                      tuple(received) if received is not None else None, bool(newest_first), top, top_left,
                      int(generation), None if immutable is None else bool(immutable))


def _xor(data: bytes, key: bytes, nonce: bytes) -> bytes:
    """Hide the token's fields (a keystream from SHA-256 over key, MAC and block number)."""
    stream = bytearray()
    block = 0
    while len(stream) < len(data):
        stream += hashlib.sha256(key + nonce + block.to_bytes(4, "big")).digest()
        block += 1
    return bytes(a ^ b for a, b in zip(data, stream, strict=False))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc
