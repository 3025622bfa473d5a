"""The IMAP provider: ``MailProvider`` for any IMAP4rev1 server (Dovecot, Gmail, Fastmail, ...).

It plugs into the engine exactly like the Graph provider: the engine asks
for the next batch of a folder's changes with an opaque cursor and gets
upserts, removals, a new cursor and "complete"; it never sees a UID.

Identity
--------
A message's id is ``<folder key>.<UIDVALIDITY>.<UID>`` (the folder key is a
short hash of the mailbox name: UIDs are only unique within one mailbox,
and two mailboxes created in the same second share a UIDVALIDITY). A move
is therefore a removal in the source folder plus an addition in the
target, which converges like any other change. Stable ids (RFC 8474
EMAILID, Gmail's X-GM-MSGID) are *not* used as document ids, deliberately:
IMAP reports expunges as UIDs only (VANISHED, or a UID set diff), so turning
an expunge into a removal needs each UID's id — a map as large as the
folder that the provider has nowhere to keep (cursors are saved in a table
row after every page). docs/imap.md describes the port change that would
make moves updates (removal by folder-local key in the store). Debian's
Dovecot 2.3.19 does not offer OBJECTID anyway (measured: no capability,
``UID FETCH ... EMAILID`` is a BAD command).

A folder's id is its mailbox name (decoded modified UTF-7); a rename is a
removal and an addition of the folder (the engine resyncs the new one).

Versions (must only grow per message)
-------------------------------------
With CONDSTORE the version is the message's MODSEQ: the server raises it
on every change, ids never outlive a UIDVALIDITY, so the store's "newer
or equal wins" is exact and needs no clock. Without CONDSTORE it is the
time we read the message in ms, forced above the last version handed out
along the cursor (``floor``), as the Graph provider does for its ties.

Per-folder state machine (the cursor, ``imap_cursor.FolderCursor``)::

      None ──EXAMINE──► walk(below = UIDNEXT, baseline = HIGHESTMODSEQ, UIDNEXT)
                          │  one page: the newest ≤ page_size UIDs below ``below``
                          │  (UID SEARCH in a window, UID FETCH of those)
                          ▼
                        walk(below = lowest UID read) ... no UIDs left
                          │  (complete = False: the catch-up below still belongs to this round;
                          │   complete at once when the walk was the first call, in modes q and c)
                          ▼
        ┌────────────► sync(baseline) ──incremental──► changes ≤ page ──► sync(new baseline), complete
        │                                              │ more than a page
        │                                              ▼
        └──────────── drain(below, old baseline → new baseline) ... pages of the changed UIDs

Incremental rounds, by what the server offers (chosen once per cursor):

* ``q`` QRESYNC: ``EXAMINE box (QRESYNC (uidvalidity modseq))`` returns, in
  one round trip, ``VANISHED (EARLIER)`` for what was expunged and a FETCH
  of every message changed since ``modseq``; nothing changed costs exactly
  that one command.
* ``c`` CONDSTORE: ``UID FETCH 1:* (UID) (CHANGEDSINCE modseq)`` for the
  changes; expunges from counts: if EXISTS is not the messages we held
  plus the new ones, a ``UID SEARCH ALL`` is compared with the cursor's
  block checksums and only blocks that differ yield removals.
* ``f`` neither: ``UID FETCH 1:* (UID FLAGS)`` of the whole folder, compared
  block by block with the checksums of UIDs and flags; changed blocks are
  read again in full, their missing UIDs removed.

The walk reads newest first (highest UIDs first) so the page fills from
the top, and the catch-up at its end (an incremental step from the
baseline taken when the walk began) brings in everything that changed
while it ran: the round is complete only when the folder is in sync as
of then. UIDVALIDITY different from the cursor's → ``CursorExpired``.

What a page costs: one ``UID SEARCH`` and one ``UID FETCH`` of UID, FLAGS,
INTERNALDATE, MODSEQ, ``BODY.PEEK[HEADER]`` (the envelope's headers, see
imap_mapping for why not ENVELOPE) and ``BODY.PEEK[TEXT]<0.N>`` (the
preview). No RFC822.SIZE: the store keeps no size.

Folders: LIST (with SPECIAL-USE and LIST-STATUS counts when offered);
``\\Noselect`` and virtual folders (``\\All``, ``\\Flagged``, ``\\Important``:
Gmail's All Mail, Starred, Important hold copies of other folders' mail)
are not synced. Roles come from SPECIAL-USE, else (servers without it)
from the usual names.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import orjson

from mailsync.errors import CursorExpired, InputError, MailsyncError, ProviderAuthError, ReauthRequired
from mailsync.models import Account, Folder, FolderBatch, Message, MessageBatch
from mailsync.ports import TokenProvider
from mailsync.providers.imap_cursor import (
    FolderCursor,
    add_to_blocks,
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
from mailsync.providers.imap_mapping import AddressCache, flags_key, map_message
from mailsync.providers.imap_session import ImapEndpoint, ImapSession, LazySession, MailboxEntry, SelectInfo
from mailsync.security.outbound import OutboundPolicy
from mailsync.settings import Settings

log = logging.getLogger("mailsync.providers.imap")

PATHS = ("qresync", "condstore", "scan")
_MODE_OF_PATH = {"qresync": "q", "condstore": "c", "scan": "f"}
ROLE_OF_FLAG = {"\\sent": "sentitems", "\\drafts": "drafts", "\\trash": "deleteditems", "\\junk": "junkemail",
                "\\archive": "archive"}
# Servers without SPECIAL-USE: the names their clients create (lower-case, leaf names).
ROLE_OF_NAME = {
    "sent": "sentitems", "sent items": "sentitems", "sent messages": "sentitems", "sent mail": "sentitems",
    "drafts": "drafts", "draft": "drafts", "trash": "deleteditems", "deleted items": "deleteditems",
    "deleted messages": "deleteditems", "junk": "junkemail", "spam": "junkemail", "junk e-mail": "junkemail",
    "bulk mail": "junkemail", "archive": "archive", "archives": "archive",
}
SKIPPED_FLAGS = frozenset({"\\noselect", "\\nonexistent", "\\all", "\\flagged", "\\important"})
PREVIEW_BYTES = 2048
_MIN_WINDOW = 64


def folder_key(folder_id: str) -> str:
    """The short, stable prefix of a folder's message ids."""
    return hashlib.sha1(folder_id.encode("utf-8")).hexdigest()[:10]


def message_id_of(folder_id: str, uidvalidity: int, uid: int) -> str:
    return f"{folder_key(folder_id)}.{uidvalidity}.{uid}"


@dataclass(frozen=True)
class _Page:
    upserts: tuple[Message, ...]
    removals: tuple[str, ...]
    cursor: FolderCursor
    complete: bool


class ImapProvider:
    """``MailProvider`` for one IMAP account over one connection (opened lazily, reopened after a fault).

    ``paths`` limits the change-tracking paths the provider may use (the
    server's capabilities still decide among them); tests use it to drive
    the CONDSTORE and full-scan paths on a server that offers QRESYNC.
    Calls are serialised by a lock: the engine's page reader calls from
    its own thread.
    """

    # A cursor is our own record of the folder (imap_cursor.FolderCursor), not a server-side link:
    # an old one is as good as a new one, so the engine may read ahead as far as memory allows.
    cursors_expire = False

    def __init__(self, connect: Callable[[], ImapSession], account_id: str, *, page_size: int = 500,
                 preview_bytes: int = PREVIEW_BYTES, paths: Sequence[str] = PATHS,
                 clock: Callable[[], float] = time.time) -> None:
        unknown = set(paths) - set(PATHS)
        if unknown or not paths:
            raise ValueError(f"paths must be a non-empty subset of {PATHS}")
        self._account_id = account_id
        self._page_size = max(1, page_size)
        self._preview_bytes = preview_bytes
        self._paths = tuple(paths)
        self._clock = clock
        wanted = [e for p, e in (("qresync", "QRESYNC"), ("condstore", "CONDSTORE")) if p in self._paths]
        self._session = LazySession(connect, wanted)
        self._addresses = AddressCache()

    def close(self) -> None:
        self._session.close()

    def _mode_for(self, session: ImapSession, info: SelectInfo) -> str:
        if info.highestmodseq is not None:
            if "qresync" in self._paths and "QRESYNC" in session.enabled:
                return "q"
            if "condstore" in self._paths and (session.has("CONDSTORE") or "QRESYNC" in session.enabled):
                return "c"
        return "f"

    def _usable(self, session: ImapSession, mode: str) -> bool:
        if mode == "q":
            return "qresync" in self._paths and "QRESYNC" in session.enabled
        if mode == "c":
            return "condstore" in self._paths and (session.has("CONDSTORE") or "QRESYNC" in session.enabled)
        return True

    # --- folders -------------------------------------------------------------------------------------

    def folder_changes(self, cursor: str | None) -> FolderBatch:
        known = decode_list_cursor(cursor) if cursor is not None else {}
        with self._session.use() as session:
            entries = session.list_mailboxes()
        folders = folders_from_list(self._account_id, entries)
        digests = {f.folder_id: _folder_digest(f) for f in folders}
        upserts = tuple(f for f in folders if known.get(f.folder_id) != digests[f.folder_id])
        removals = tuple(sorted(set(known) - set(digests)))
        return FolderBatch(upserts=upserts, removals=removals, cursor=encode_list_cursor(digests), complete=True)

    # --- messages -------------------------------------------------------------------------------------

    def message_changes_many(self, reads: Sequence[tuple[str, str | None]]) -> list[MessageBatch | MailsyncError]:
        """One read after the other on the account's connection (IMAP has no batching across folders:
        each SELECTs its folder); a read's error is its own, a lost connection refuses the reads after it
        too (each tries on its own and fails or reconnects as ``message_changes`` does)."""
        found: list[MessageBatch | MailsyncError] = []
        for folder_id, cursor in reads:
            try:
                found.append(self.message_changes(folder_id, cursor))
            except (ReauthRequired, ProviderAuthError):
                raise          # the account's, not the read's
            except MailsyncError as exc:
                found.append(exc)
        return found

    def message_changes(self, folder_id: str, cursor: str | None) -> MessageBatch:
        state = decode_folder_cursor(cursor) if cursor is not None else None
        with self._session.use() as session:
            if state is None:
                page = self._start_walk(session, folder_id)
            else:
                if not self._usable(session, state.mode):
                    raise CursorExpired(f"the server no longer offers what cursor mode {state.mode!r} needs")
                if state.stage == "walk":
                    page = self._walk(session, folder_id, state)
                elif state.stage == "drain":
                    page = self._drain(session, folder_id, state)
                else:
                    page = self._incremental(session, folder_id, state)
        return MessageBatch(upserts=page.upserts, removals=page.removals,
                            cursor=encode_folder_cursor(page.cursor), complete=page.complete)

    def newest_messages(self, folder_id: str, limit: int) -> tuple[Message, ...]:
        with self._session.use() as session:
            info = session.examine(folder_id)
            mode = self._mode_for(session, info)
            if session.has("SORT"):
                uids = session.uid_sort_arrival_desc()[:limit]
            else:
                # No SORT: the highest UIDs are nearly the newest; order a few more of them by arrival.
                candidates = session.uid_search("ALL")[-4 * limit:]
                dates = session.uid_fetch(uid_set(candidates), "UID INTERNALDATE")
                uids = sorted(dates, key=lambda u: (dates[u].get(b"INTERNALDATE") is not None,
                                                    dates[u].get(b"INTERNALDATE"), u), reverse=True)[:limit]
            # Version 0 without CONDSTORE: the first full round rewrites these whatever its clock says.
            messages = self._fetch(session, folder_id, info.uidvalidity, uids, mode, version=0)
        order = {uid: n for n, uid in enumerate(uids)}
        return tuple(sorted(messages, key=lambda m: order[int(m.message_id.rsplit(".", 1)[1])]))

    # --- the walk (initial pass, newest first) ----------------------------------------------------------

    def _start_walk(self, session: ImapSession, folder_id: str) -> _Page:
        info = session.examine(folder_id)
        mode = self._mode_for(session, info)
        state = FolderCursor(
            uidvalidity=info.uidvalidity, mode=mode, stage="walk", below=max(info.uidnext, 1),
            target_modseq=info.highestmodseq or 0, target_uidnext=max(info.uidnext, 1),
            block_bits=block_bits_for(info.uidnext), floor=int(self._clock() * 1000))
        if info.uidnext == 0:
            # A server that does not say UIDNEXT: walk from above the highest UID there is.
            top = session.uid_search("ALL")
            below = (top[-1] + 1) if top else 1
            state = state.with_(below=below, target_uidnext=below, block_bits=block_bits_for(below))
        return self._walk(session, folder_id, state, info)

    def _walk(self, session: ImapSession, folder_id: str, state: FolderCursor,
              info: SelectInfo | None = None) -> _Page:
        # Given only by _start_walk: the EXAMINE of this very call, the round's baseline.
        baseline_now = info is not None
        info = info or session.examine(folder_id, reuse=True)
        self._check_validity(state, info)
        uids, exhausted = self._next_window(session, state.below, info)
        version = self._scan_version(state)
        flags: dict[int, tuple[bytes, ...]] = {}
        messages = self._fetch(session, folder_id, state.uidvalidity, uids, state.mode, version=version,
                               flags_out=flags)
        blocks = dict(state.blocks)
        count = state.count
        if state.mode != "q":
            for uid, uid_flags in flags.items():
                checksum = uid_checksum(uid) if state.mode == "c" else uid_checksum(uid, flags_key(uid_flags))
                add_to_blocks(blocks, state.block_bits, uid, checksum)
                count += 1
        below = min(uids) if uids else 1
        if exhausted:
            # The walk is over: the catch-up from the baseline is the next (and last) step of this round.
            done = state.with_(stage="sync", below=0, modseq=state.target_modseq, uidnext=state.target_uidnext,
                               target_modseq=0, target_uidnext=1, blocks=blocks, count=count, floor=version)
            # Unless the whole walk was this one call, right after the EXAMINE that took its baseline
            # (a folder of one page: most folders, and every one a new account's first pass takes). The
            # catch-up is there for what changed while a walk of several calls ran; here nothing ran
            # between the baseline and the FETCH but the FETCH itself, which already saw the state of
            # then (a change after it has a MODSEQ above the baseline, where the cursor stands: the
            # folder's next incremental round reads it, and STATUS/IDLE show it moved). So the round
            # ends here, and its folder is not visited once more only to learn that nothing changed
            # (a lease, an EXAMINE, a FETCH CHANGEDSINCE, remove_stale's refresh and delete-by-query,
            # the row's finish: five such rounds were a ~6 s chain per new account in
            # bench/imap_initial_sync.py). Without CONDSTORE (mode "f") the catch-up compares the
            # whole folder's flags instead, and stays.
            return _Page(tuple(messages), (), done, complete=baseline_now and state.mode in ("q", "c"))
        return _Page(tuple(messages), (), state.with_(below=below, blocks=blocks, count=count, floor=version),
                     complete=False)

    def _next_window(self, session: ImapSession, below: int, info: SelectInfo) -> tuple[list[int], bool]:
        """The newest ≤ page_size UIDs below ``below``, and whether none are left beneath them."""
        if below <= 1:
            return [], True
        density = info.exists / max(info.uidnext - 1, info.exists, 1)
        window = max(_MIN_WINDOW, int(self._page_size / max(density, 0.001) * 1.25))
        hi = below - 1
        while True:
            lo = max(1, hi - window + 1)
            found = session.uid_search(f"UID {lo}:{hi}")
            found = [u for u in found if lo <= u <= hi]   # "UID n:m" with n > every UID matches the last one
            if len(found) > self._page_size:
                return found[-self._page_size:], False
            if found or lo == 1:
                return found, lo == 1
            hi, window = lo - 1, window * 4

    # --- incremental rounds ----------------------------------------------------------------------------------

    def _incremental(self, session: ImapSession, folder_id: str, state: FolderCursor) -> _Page:
        if state.mode == "q":
            return self._incremental_qresync(session, folder_id, state)
        if state.mode == "c":
            return self._incremental_condstore(session, folder_id, state)
        return self._incremental_scan(session, folder_id, state)

    def _incremental_qresync(self, session: ImapSession, folder_id: str, state: FolderCursor) -> _Page:
        info = session.examine(folder_id, qresync=(state.uidvalidity, state.modseq))
        self._check_validity(state, info)
        if info.highestmodseq is None:
            # Protocol quirk. With CONDSTORE enabled (QRESYNC enables it) every SELECT/EXAMINE answer
            # must carry HIGHESTMODSEQ, or NOMODSEQ for a mailbox without mod-sequences (RFC 7162
            # 3.1.2.1); VANISHED and the changed FETCHes only mean "nothing else changed since modseq"
            # when it does. Dovecot 2.3 (Maildir) answers without either once a mailbox's index was
            # reset, and a UIDVALIDITY change resets it (a restore; the tests' `doveadm mailbox update
            # --uid-validity`). Worse, a connection that had the mailbox open shortly before (Dovecot
            # keeps recently closed indexes open) got the *old* UIDVALIDITY in its first EXAMINE after
            # the reset — its cached index — and the right one from the next EXAMINE on: 12 of 25 times
            # in a loop of sync, reset, round (tests/providers contract's broken-cursor test failed "did
            # not raise" under load that way). The UIDVALIDITY check above passed, QRESYNC reported
            # nothing, and the round completed on a broken cursor; only the next round noticed. Taken as
            # "unchanged" (the cursor's own modseq), a missing HIGHESTMODSEQ hid exactly that. So, as on
            # the CONDSTORE path: no HIGHESTMODSEQ, no incremental round — the folder starts again.
            raise CursorExpired("the folder stopped reporting HIGHESTMODSEQ")
        upper = max(info.uidnext, state.uidnext)
        removals = [message_id_of(folder_id, state.uidvalidity, uid)
                    for line in info.vanished for uid in _vanished_uids(line, upper)]
        changed = sorted(info.changed)
        target = (info.highestmodseq, max(info.uidnext, state.uidnext))
        return self._changed_page(session, folder_id, state, changed, removals, target)

    def _incremental_condstore(self, session: ImapSession, folder_id: str, state: FolderCursor) -> _Page:
        info = session.examine(folder_id, condstore=True)
        self._check_validity(state, info)
        modseq = info.highestmodseq
        if modseq is None:
            raise CursorExpired("the folder stopped reporting HIGHESTMODSEQ")
        if modseq == state.modseq and info.uidnext == state.uidnext and info.exists == state.count:
            return _Page((), (), state, complete=True)   # the cheap "nothing happened"
        changed = sorted(session.uid_fetch("1:*", "UID", f"CHANGEDSINCE {state.modseq}"))
        new = [uid for uid in changed if uid >= state.uidnext]
        blocks, count, removals = dict(state.blocks), state.count, []
        if info.exists != state.count + len(new):
            # Something was expunged (or arrived while we looked): compare UID blocks to find what.
            current = session.uid_search("ALL")
            fresh = blocks_of(state.block_bits, ((uid, uid_checksum(uid)) for uid in current))
            removals = self._missing_in(folder_id, state, changed_blocks(state.blocks, fresh), set(current),
                                        max(info.uidnext, state.uidnext))
            blocks, count = fresh, len(current)
        else:
            for uid in new:
                add_to_blocks(blocks, state.block_bits, uid, uid_checksum(uid))
            count += len(new)
        state = state.with_(blocks=blocks, count=count)
        target = (modseq, max(info.uidnext, state.uidnext, (changed[-1] + 1) if changed else 0))
        return self._changed_page(session, folder_id, state, changed, removals, target)

    def _incremental_scan(self, session: ImapSession, folder_id: str, state: FolderCursor) -> _Page:
        info = session.examine(folder_id)
        self._check_validity(state, info)
        listing = session.uid_fetch("1:*", "UID FLAGS")
        fresh = blocks_of(state.block_bits, ((uid, uid_checksum(uid, flags_key(item.get(b"FLAGS") or ())))
                                             for uid, item in listing.items()))
        moved = changed_blocks(state.blocks, fresh)
        uidnext = max(info.uidnext, state.uidnext, (max(listing) + 1) if listing else 0)
        state = state.with_(blocks=fresh, count=len(listing), uidnext=uidnext)
        if not moved:
            return _Page((), (), state, complete=True)
        removals = self._missing_in(folder_id, state, moved, set(listing), uidnext)
        bits = state.block_bits
        moved_set = set(moved)
        pending = sorted(uid for uid in listing if (uid >> bits) in moved_set)
        page, rest = pending[-self._page_size:], pending[:-self._page_size]
        version = self._scan_version(state)
        messages = self._fetch(session, folder_id, state.uidvalidity, page, "f", version=version)
        if rest:
            left = tuple(sorted({uid >> bits for uid in rest}))
            return _Page(tuple(messages), tuple(removals),
                         state.with_(stage="drain", below=min(page), pending=left, floor=version), complete=False)
        return _Page(tuple(messages), tuple(removals), state.with_(stage="sync", pending=(), floor=version),
                     complete=True)

    def _changed_page(self, session: ImapSession, folder_id: str, state: FolderCursor, changed: list[int],
                      removals: list[str], target: tuple[int, int]) -> _Page:
        """First page of an incremental round in modes q/c: the newest changed UIDs, then drain or done."""
        page, rest = changed[-self._page_size:], changed[:-self._page_size]
        messages = self._fetch(session, folder_id, state.uidvalidity, page, state.mode, version=0)
        if rest:
            drain = state.with_(stage="drain", below=min(page), target_modseq=target[0], target_uidnext=target[1])
            return _Page(tuple(messages), tuple(removals), drain, complete=False)
        done = state.with_(stage="sync", below=0, modseq=target[0], uidnext=target[1])
        return _Page(tuple(messages), tuple(removals), done, complete=True)

    def _drain(self, session: ImapSession, folder_id: str, state: FolderCursor) -> _Page:
        """Further pages of a round with more changes than one page (all modes)."""
        info = session.examine(folder_id, reuse=True)
        self._check_validity(state, info)
        if state.below <= 1:
            remaining: list[int] = []
        elif state.mode == "f":
            bits = state.block_bits
            ranges = [(max(1, b << bits), min(((b + 1) << bits) - 1, state.below - 1)) for b in state.pending]
            spec = ",".join(f"{lo}:{hi}" for lo, hi in ranges if lo <= hi)
            remaining = [u for u in session.uid_search(f"UID {spec}") if u < state.below] if spec else []
        else:
            found = session.uid_fetch(f"1:{state.below - 1}", "UID", f"CHANGEDSINCE {state.modseq}")
            remaining = sorted(u for u in found if u < state.below)
        page, rest = remaining[-self._page_size:], remaining[:-self._page_size]
        version = self._scan_version(state) if state.mode == "f" else 0
        messages = self._fetch(session, folder_id, state.uidvalidity, page, state.mode, version=version)
        if rest:
            left = tuple(sorted({u >> state.block_bits for u in rest})) if state.mode == "f" else ()
            more = state.with_(below=min(page), pending=left, floor=max(state.floor, version))
            return _Page(tuple(messages), (), more, complete=False)
        if state.mode == "f":
            done = state.with_(stage="sync", below=0, pending=(), floor=max(state.floor, version))
        else:
            done = state.with_(stage="sync", below=0, modseq=state.target_modseq, uidnext=state.target_uidnext,
                               target_modseq=0, target_uidnext=1)
        return _Page(tuple(messages), (), done, complete=True)

    # --- helpers ------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_validity(state: FolderCursor, info: SelectInfo) -> None:
        if info.uidvalidity != state.uidvalidity:
            raise CursorExpired(f"UIDVALIDITY of {info.name!r} changed ({state.uidvalidity} → {info.uidvalidity})")

    def _scan_version(self, state: FolderCursor) -> int:
        """Mode f: now in ms, above every version this cursor handed out before."""
        return max(int(self._clock() * 1000), state.floor + 1)

    def _missing_in(self, folder_id: str, state: FolderCursor, blocks: Iterable[int], current: set[int],
                    upper: int) -> list[str]:
        """Ids of every UID of ``blocks`` (below ``upper``) that is not in ``current``: the removals."""
        bits = state.block_bits
        found: list[str] = []
        for block in blocks:
            for uid in range(max(1, block << bits), min((block + 1) << bits, upper)):
                if uid not in current:
                    found.append(message_id_of(folder_id, state.uidvalidity, uid))
        return found

    def _fetch(self, session: ImapSession, folder_id: str, uidvalidity: int, uids: Sequence[int], mode: str, *,
               version: int, flags_out: dict[int, tuple[bytes, ...]] | None = None) -> list[Message]:
        """Full records of ``uids`` (newest first). Versions: MODSEQ in modes q/c, else ``version``.

        UIDs expunged meanwhile are simply not returned. ``flags_out`` receives each UID's raw flags.
        """
        if not uids:
            return []
        items = "UID FLAGS INTERNALDATE"
        if mode in ("q", "c"):
            items += " MODSEQ"
        items += f" BODY.PEEK[HEADER] BODY.PEEK[TEXT]<0.{self._preview_bytes}>"
        fetched = session.uid_fetch(uid_set(uids), items)
        account_id = self._account_id
        key = folder_key(folder_id)
        addresses = self._addresses
        messages: list[Message] = []
        for uid in sorted(fetched, reverse=True):
            item = fetched[uid]
            header_block = text = None
            for name, value in item.items():
                if name.startswith(b"BODY[HEADER"):
                    header_block = value if isinstance(value, bytes) else None
                elif name.startswith(b"BODY[TEXT]"):
                    text = value if isinstance(value, bytes) else None
            if mode in ("q", "c"):
                modseq = item.get(b"MODSEQ")
                message_version = int(modseq[0]) if isinstance(modseq, tuple) and modseq else 0
            else:
                message_version = version
            flags = tuple(item.get(b"FLAGS") or ())
            if flags_out is not None:
                flags_out[uid] = flags
            messages.append(map_message(
                account_id=account_id, folder_id=folder_id, message_id=f"{key}.{uidvalidity}.{uid}",
                version=message_version, flags=flags, internal_date=item.get(b"INTERNALDATE"),
                header_block=header_block, text=text, addresses=addresses))
        return messages


STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ")


def cursor_at_rest(cursor: str | None) -> bool:
    """Is a folder's cursor between rounds (stage ``sync``), i.e. one ``folder_moved`` can compare?"""
    if not cursor:
        return False
    try:
        return decode_folder_cursor(cursor).stage == "sync"
    except CursorExpired:
        return False


def folder_moved(cursor: str | None, entry: MailboxEntry) -> bool:
    """Does a folder's STATUS (``STATUS_ITEMS``) differ from where its cursor left it?

    For the STATUS poller and the listener. Only a cursor at rest (stage
    ``sync``) is compared: a walk or drain in progress has its own catch-up
    at the end of its round. Without HIGHESTMODSEQ (mode ``f``) only new
    mail and expunges show in STATUS; flag changes wait for the periodic
    full sweep.
    """
    if not cursor:
        return False
    try:
        state = decode_folder_cursor(cursor)
    except CursorExpired:
        return True
    if state.stage != "sync":
        return False
    if entry.uidvalidity is not None and entry.uidvalidity != state.uidvalidity:
        return True
    if entry.uidnext is not None and entry.uidnext != state.uidnext:
        return True
    if state.mode in ("q", "c") and entry.highestmodseq is not None and entry.highestmodseq != state.modseq:
        return True
    return state.mode != "q" and entry.messages is not None and entry.messages != state.count


def _vanished_uids(line: bytes, upper: int) -> list[int]:
    text = line.decode("ascii", "replace")
    if text.upper().startswith("(EARLIER)"):
        text = text[len("(EARLIER)"):]
    return parse_uid_set(text.strip(), upper=upper)


def _folder_digest(folder: Folder) -> str:
    body = orjson.dumps([folder.name, folder.parent_id, folder.role, folder.total_count, folder.unread_count,
                         folder.child_folder_count])
    return format(zlib.crc32(body), "08x")


def folders_from_list(account_id: str, entries: Sequence[MailboxEntry]) -> list[Folder]:
    """LIST lines → ``Folder`` records (roles, parents, child counts); virtual and \\Noselect ones left out."""
    usable = [e for e in entries if not (e.flags & SKIPPED_FLAGS)]
    by_name = {e.name: e for e in usable}
    special = any(e.flags & set(ROLE_OF_FLAG) for e in entries)
    parents: dict[str, str | None] = {}
    for entry in usable:
        parent: str | None = None
        if entry.delimiter and entry.delimiter in entry.name:
            path = entry.name
            while entry.delimiter in path and parent is None:
                path = path.rsplit(entry.delimiter, 1)[0]
                if path in by_name:
                    parent = path
        parents[entry.name] = parent
    children: dict[str, int] = {}
    for parent in parents.values():
        if parent is not None:
            children[parent] = children.get(parent, 0) + 1
    folders: list[Folder] = []
    taken: set[str] = set()
    for entry in usable:
        leaf = entry.name.rsplit(entry.delimiter, 1)[-1] if entry.delimiter else entry.name
        role: str | None = None
        if entry.name.upper() == "INBOX":
            role = "inbox"
        else:
            for flag in entry.flags:
                role = role or ROLE_OF_FLAG.get(flag)
            if role is None and not special and parents[entry.name] is None:
                role = ROLE_OF_NAME.get(leaf.lower())
        if role is not None:
            if role in taken:
                role = None   # one folder per role (the first the server lists)
            else:
                taken.add(role)
        folders.append(Folder(account_id=account_id, folder_id=entry.name, name=leaf, parent_id=parents[entry.name],
                              role=role, total_count=entry.messages, unread_count=entry.unseen,
                              child_folder_count=children.get(entry.name, 0)))
    return folders


# --- credentials and the factory ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImapCredentials:
    """What linking stores (sealed) for an IMAP account: the endpoint and its password.

    For ``auth == "xoauth2"`` the secret is not stored here: the access
    token comes from an OAuth token provider at every login.
    """

    endpoint: ImapEndpoint
    password: str = ""

    def to_json(self) -> str:
        e = self.endpoint
        return orjson.dumps({"v": 1, "host": e.host, "port": e.port, "security": e.security,
                             "username": e.username, "auth": e.auth, "password": self.password}).decode()

    @classmethod
    def from_json(cls, text: str) -> ImapCredentials:
        try:
            body = orjson.loads(text)
            endpoint = ImapEndpoint(host=str(body["host"]), port=int(body["port"]), security=str(body["security"]),
                                    username=str(body["username"]), auth=str(body.get("auth") or "password"))
            return cls(endpoint=endpoint, password=str(body.get("password") or ""))
        except (ValueError, KeyError, TypeError, InputError) as exc:
            raise ReauthRequired("the stored IMAP settings cannot be read; link the account again") from exc


class ImapProviderFactory:
    """``ProviderFactory`` for IMAP accounts.

    ``credentials`` is a ``TokenProvider`` that returns the account's sealed
    IMAP settings (``ImapCredentials`` JSON; see mailsync.linking.imap);
    ``oauth_tokens`` gives XOAUTH2 access tokens for accounts linked that way.
    """

    def __init__(self, settings: Settings, credentials: TokenProvider, *,
                 oauth_tokens: TokenProvider | None = None, paths: Sequence[str] = PATHS) -> None:
        self._settings = settings
        self._credentials = credentials
        self._oauth = oauth_tokens
        self._paths = tuple(paths)
        # Checked at every connection, not only at linking: a name may move into a private range later.
        self._policy = OutboundPolicy.from_entries(settings.imap_allowed_hosts)
        # One TLS context for every connection this factory opens (rounds, polls, the listener): making
        # one loads the system's CA bundle, ~25 ms of CPU. A client context may be shared by threads.
        self._tls: ssl.SSLContext | None = None

    def credentials(self, account_id: str) -> ImapCredentials:
        return ImapCredentials.from_json(self._credentials.access_token(account_id))

    def connect(self, account_id: str) -> ImapSession:
        """A logged-in session for the account (also used by the poller and the listener)."""
        creds = self.credentials(account_id)
        settings = self._settings

        def secret(force_refresh: bool) -> str:
            if creds.endpoint.auth == "xoauth2":
                if self._oauth is None:
                    raise ReauthRequired("no OAuth token provider for this XOAUTH2 account")
                return self._oauth.access_token(account_id, force_refresh=force_refresh)
            return creds.password

        return ImapSession.connect(creds.endpoint, secret, timeout_s=settings.imap_timeout_s,
                                   allow_insecure=settings.imap_allow_insecure, policy=self._policy,
                                   ssl_context=self._tls_context() if creds.endpoint.security != "none" else None)

    def _tls_context(self) -> ssl.SSLContext:
        # Two threads may both make one the first time; either is as good, and later calls reuse it.
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def open(self, account: Account) -> ImapProvider:
        account_id = account.account_id
        return ImapProvider(lambda: self.connect(account_id), account_id, page_size=self._settings.imap_page_size,
                            paths=self._paths)
