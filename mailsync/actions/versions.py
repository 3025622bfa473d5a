"""Which store version an optimistic row, and a reverted one, is written with.

The store keeps a write only if its version is at least the stored one
(``external_gte``), and the sync engine writes what delta pages say with
the provider's versions. An action's row must beat every page read
*before* the action and lose to every page read *after* the provider has
it. How, depends on what the provider's versions are:

* Graph: ``lastModifiedDateTime`` in ms, whole seconds, the spare
  milliseconds filled with the time the page was read, clamped to its
  second (``mailsync.providers.graph.message_version``). A page read
  before the action at ``T`` has a version below ``T`` (both parts are at
  most its read time); a page read after the provider applied it has a
  version of at least ``T``'s second plus its own read offset, which is
  past ``T``. So the optimistic row is written at ``T`` (the action's time
  in ms): older pages are refused, newer ones win, Outlook's own later
  change (even in the same second) wins.
* IMAP with CONDSTORE: MODSEQs, small integers the server raises on every
  change. A clock value would outrank every later MODSEQ and freeze the
  row for ever, so the optimistic row keeps the stored version (equal is
  accepted). After the STORE the message has a higher MODSEQ and any page
  read since then carries it. The gap: a page read before the action that
  carries a change *newer than the stored row* (another client's change
  not yet applied) can undo the optimistic value until the next round,
  which carries the action's MODSEQ and restores it.
* IMAP without CONDSTORE: versions are read times in ms, like Graph's
  fill: the Graph rule applies.

A row reverted after a definitive failure must beat the optimistic one.
Graph and IMAP-time rows: one ms past it (or now). IMAP-MODSEQ rows: the
higher of it and the MODSEQ just read (equal wins) — and one more when the
row is *absent* from the store when the undo begins. A removal bumps a
document's version by one and the store keeps that tombstone for a minute
(docs/store.md; and only a removal moves a stored version past what was
written: a round's seen mark is a document of its own, since an update of
the row would raise its version too and leave this one short): an IMAP
move into a folder another client deletes meanwhile fails at the server,
but the engine's folder round may remove the folder from the store first,
and with it the optimistic row that said the message was there. Written at
the optimistic MODSEQ, the provider's truth was then refused by that
tombstone, and since the message did not change at the server no delta
round ever brought it back: missing for good (the IMAP convergence test's
every-fault scenario, 5 runs in 7). One above never hides a later change
(the server gives the message's next change a MODSEQ above the folder's
HIGHESTMODSEQ, so at least this one). But only for an absent row: a
present one needs no more than equal, and "one more" there would also beat
the tombstone of a removal that lands while the undo runs (the message
expunged and its removal written between the read and the write), bringing
back a message that is gone.
"""

from __future__ import annotations

# MODSEQs stay far below this; ms timestamps are above it since 1973.
_MODSEQ_CEILING = 100_000_000_000


def uses_clock(provider_is_graph: bool, stored: int) -> bool:
    """True for ms-timestamp versions (Graph; IMAP without CONDSTORE), False for MODSEQs.

    An IMAP row of version 0 (a first-screen row) counts as a MODSEQ one: a
    clock version there would outrank the MODSEQs the folder's round writes.
    """
    return provider_is_graph or stored >= _MODSEQ_CEILING


def optimistic_version(stored: int, now_ms: int, *, clock: bool) -> int:
    return max(stored, now_ms) if clock else stored


def revert_version(optimistic: int, now_ms: int, *, clock: bool, truth: int = 0, absent: bool = False) -> int:
    """The version of a row put back to the provider's truth.

    ``truth``: the version the provider just gave; ``absent``: the store had no row for the message when
    the undo began (read before the provider was asked).
    """
    if clock:
        return max(optimistic + 1, now_ms)
    return max(optimistic, truth) + (1 if absent else 0)
