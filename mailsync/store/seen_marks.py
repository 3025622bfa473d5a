"""Seen marks: "the round of epoch E of folder F saw this message", kept beside the message, never on it.

Why a mark at all. A full round (a resync) writes every message the
provider still has with the folder's new epoch, and ``remove_stale`` then
deletes the folder's messages marked with an older one. A write the
cluster refuses because a newer version is stored still *saw* the message:
normally the newer version is a later page's, but it can be ahead of the
provider (a user action's optimistic row, mailsync.actions.versions), and
its document carries whatever epoch its writer read, possibly one from
before the resync began. So a refused write, and a user action that
learns of a resync only after it wrote (``SearchStore.raise_epoch``),
record that the round saw the message, or ``remove_stale`` deletes a
message the provider has and no delta round will ever list again.

Why not on the message's document. Messages are written with
``version_type=external_gte`` and the provider's version (Graph: ms;
IMAP: the MODSEQ), which is what refuses an older write without a read
and lets an equal one win: re-applying a page, an IMAP optimistic row
written at the stored MODSEQ, the undo of a failed action at that MODSEQ.
The mark used to be a partial update of ``sync_epoch`` with
``if_seq_no``. Every engine runs an update (partial or scripted) as a
re-index with *internal* versioning, and an internal write sets
``_version`` to the stored one plus one, whatever versioning wrote the
document before (OpenSearch 2.19 and Elasticsearch alike: a document at
external version 10 is at 11 after a partial update, and an index at
version 10 is then refused with ``current version [11] is higher than the
one provided [10]``). So after a mark:

* a write at the equal MODSEQ was refused: a failed action's undo, or a
  round re-writing the same MODSEQ over an optimistic row;
* the undo of a row that a removal deleted meanwhile, written "one above
  the tombstone" (mailsync.actions.versions), was one short: the removal
  of a marked row leaves its tombstone at stored + 2;
* each further mark (one per resync that is refused) raised it again, and
  a MODSEQ is a per-folder counter: in a quiet folder the message's next
  change gets the next MODSEQ, which the raised version refused too.

The IMAP convergence scenario with every fault lost or kept a message that
way in 1 of 14 runs.

Why not a re-index of the whole document at its own external version (no
increment). External versioning cannot be combined with ``if_seq_no``
(both engines refuse the request: "compare and write operations can not
use versioning"), so that copy would be written without a condition, and
several writers write a *different* document at the *same* version: an
IMAP optimistic row (the stored MODSEQ, the action's value), a failed
action's undo (that MODSEQ, the provider's value), a round's page at the
MODSEQ of an optimistic row (the value before the action), another mark
with another epoch. A mark that read the document before one of those and
wrote after it would put the old content back, with nothing to tell: an
undo lost that way stays lost (no delta round lists a message that did not
change).

So the mark is a document of its own in the ``<prefix>-seen`` index: one
per (folder, message, epoch), written without any condition (it only ever
adds knowledge), and ``remove_stale(F, E)`` keeps the folder's messages
that carry a mark of F with an epoch ≥ E, then drops F's marks older than E
(they can keep nothing any more: a folder's epochs only grow). A mark
belongs to its folder: a page of F refused because the message has moved to
G marks F, never G's copy, whose own resync decides about it (a copy in G
marked with F's epoch was once deleted by G's ``remove_stale``). What the
mark cannot do that the conditional update did: save a message from a
``remove_stale`` that read the marks just before the mark was written.
The round's own marks are written before its ``remove_stale`` (same
worker, in order); only a user action's ``raise_epoch`` can race it, and
for that a resync must begin, list the message and end between the
action's first epoch read and its mark, which docs/actions.md already
names as open.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mailsync.errors import StoreUnavailable
from mailsync.store import documents as docs
from mailsync.store.bulk_writer import BulkAction
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engine_errors import translating
from mailsync.store.mappings import IndexNames

# Both engines refuse a terms query over index.max_terms_count (65,536 by default) values; the
# exclusions are split into clauses well below that.
TERMS_PER_CLAUSE = 10_000
_PAGE = 10_000   # index.max_result_window's default: the largest page a search may ask for


@dataclass(frozen=True)
class Sighting:
    """A message a folder's round saw (its write was refused, or it was written before the epoch rose)."""

    account_id: str
    folder_id: str
    message_id: str


def mark_id(sighting: Sighting, epoch: int) -> str:
    """``<account_id>:seen:<digest>``: folder and message ids may be long, the mark's id may not (512 bytes)."""
    key = f"{sighting.folder_id}\x00{sighting.message_id}\x00{epoch}".encode("utf-8", "surrogatepass")
    return f"{docs.check_account_id(sighting.account_id)}:seen:{hashlib.sha256(key).hexdigest()}"


class SeenMarks:
    """Writes and reads the marks; the store sends the writes (its bulk writer) and runs the deletions."""

    def __init__(self, engine: SearchEngine, names: IndexNames) -> None:
        self._engine = engine
        self._names = names

    def actions(self, sightings: Sequence[Sighting], epoch: int) -> list[BulkAction]:
        """One index action per sighting; idempotent (same id, same content), no version, no condition."""
        return [({"index": {"_index": self._names.seen, "_id": mark_id(s, epoch), "routing": s.account_id}},
                 {"account_id": s.account_id, "folder_id": s.folder_id, "message_id": s.message_id,
                  "sync_epoch": epoch})
                for s in dict.fromkeys(sightings)]

    def of_folder(self, account_id: str, folder_id: str, epoch: int) -> tuple[set[str], bool]:
        """The message ids of ``folder_id`` marked with an epoch ≥ ``epoch``, and whether it has older marks.

        Refreshes the marks first (the round's own were written just before).
        One read of all the folder's marks: a folder has few (refused writes
        only), and knowing that none is old spares the deletion request.
        """
        seen: set[str] = set()
        older = False
        for message_id, marked in self._marks(account_id, folder_id):
            if marked >= epoch:
                seen.add(message_id)
            else:
                older = True
        return seen, older

    @staticmethod
    def keep(message_ids: set[str]) -> list[dict[str, Any]]:
        """``must_not`` clauses sparing ``message_ids`` in a query on the messages index."""
        ordered = sorted(message_ids)
        return [{"terms": {"message_id": ordered[i:i + TERMS_PER_CLAUSE]}}
                for i in range(0, len(ordered), TERMS_PER_CLAUSE)]

    @staticmethod
    def older_than(folder_id: str, epoch: int) -> list[dict[str, Any]]:
        """Filters of the folder's marks that no round can use any more."""
        return [{"term": {"folder_id": folder_id}}, {"range": {"sync_epoch": {"lt": epoch}}}]

    def _marks(self, account_id: str, folder_id: str) -> Iterator[tuple[str, int]]:
        query = {"bool": {"filter": [{"term": {"account_id": account_id}}, {"term": {"folder_id": folder_id}}]}}
        body: dict[str, Any] = {"query": query, "size": _PAGE, "_source": ["account_id", "message_id", "sync_epoch"],
                                "sort": [{"message_id": "asc"}, {"sync_epoch": "asc"}], "track_total_hits": False}
        with translating("seen marks"):
            try:
                # A search sees refreshed documents only.
                self._engine.refresh([self._names.seen])
                while True:
                    hits = self._engine.search(self._names.seen, body, routing=account_id).get("hits", {}).get(
                        "hits", [])
                    for hit in hits:
                        source = hit.get("_source") or {}
                        if source.get("account_id") == account_id and source.get("message_id"):
                            yield str(source["message_id"]), int(source.get("sync_epoch") or 0)
                    if len(hits) < _PAGE:
                        return
                    body = {**body, "search_after": hits[-1]["sort"]}
            except EngineError as exc:
                if exc.index_missing:
                    # Deleting without knowing what was seen could delete what a round saw: wait for
                    # the generation check (SearchStore.generation) to create the index again.
                    raise StoreUnavailable("seen marks: the index is missing", retry_after_s=5.0) from exc
                raise
