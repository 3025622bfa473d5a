"""The action ledger on the search engine: per message, the latest user action on each field.

One document per message acted on, in the ``<prefix>-actions`` index
family (created by ``SearchStore.ensure_ready``, routed by account,
removed with the account)::

    {account_id, message_id, seq, read_seq, read, flag_seq, flag, place_seq, place, updated_at}

Why not in the message's own document: the sync engine replaces that
document whole with every delta page (an ``index`` at the provider's
version), which would wipe the ledger at the first round, exactly when an
older job redelivered later needs it (mailsync.actions.ordering).

Claims hand out sequence numbers without scripts, like the store's
conditional removal: a realtime multi-get with ``_seq_no`` and
``_primary_term``, then each document written with ``if_seq_no`` /
``if_primary_term`` (``create`` when there was none); a write that lost to a
concurrent claim (409) is read and decided again. So two claims on one
message never get the same number, and the later one always the higher.
The number is ``max(previous + 1, now in ms)``: increasing per message, and
still above every number handed out before if a document was purged and
made again.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from mailsync.actions.models import FLAG, PLACE, READ, ActionClaim, Claimed, LatestActions, LedgerValue
from mailsync.errors import StoreError, StoreUnavailable
from mailsync.store import documents as docs
from mailsync.store.engine import EngineError, SearchEngine
from mailsync.store.engine_errors import error_parts, raise_store_error, short_reason
from mailsync.store.mappings import IndexNames

if TYPE_CHECKING:
    from mailsync.ports import ActionLedger
    from mailsync.store.search_store import SearchStore

log = logging.getLogger(__name__)

FIELDS = (READ, FLAG, PLACE)
CLAIM_ROUNDS = 20
# How long an entry is kept after its last action: far past a job's retries (minutes) and redeliveries.
RETENTION_S = 7 * 24 * 3600.0
_MGET_CHUNK = 1_000


def _raise(what: str, exc: EngineError) -> NoReturn:
    """The store's translation, except that a missing ledger index is "later", not a refusal: it is missing
    only after a lost store, and the poll tick's generation check recreates it."""
    if exc.index_missing:
        raise StoreUnavailable(f"{what}: the action ledger's index is missing", retry_after_s=5.0) from exc
    raise_store_error(what, exc)


def _unavailable(what: str, error_type: str, reason: str) -> StoreUnavailable:
    if error_type == "index_not_found_exception":
        return StoreUnavailable(f"{what}: the action ledger's index is missing", retry_after_s=5.0)
    return StoreUnavailable(f"{what}: {error_type} {short_reason(reason)}".strip(), retry_after_s=5.0)


def entry_from_source(source: dict[str, Any]) -> LatestActions:
    fields: dict[str, tuple[int, LedgerValue]] = {}
    for name in FIELDS:
        seq = source.get(f"{name}_seq")
        if seq is not None and name in source:
            fields[name] = (int(seq), source[name])
    return LatestActions(message_id=str(source.get("message_id", "")), seq=int(source.get("seq") or 0),
                         fields=fields)


class SearchActionLedger:
    """``ActionLedger`` on the search engine (see the module docstring)."""

    def __init__(self, engine: SearchEngine, names: IndexNames, *, clock: Any = time.time) -> None:
        self._engine = engine
        self._index = names.actions
        self._clock = clock

    @staticmethod
    def _iso(epoch_s: float) -> str:
        return docs.iso_time(datetime.fromtimestamp(epoch_s, UTC)) or ""

    def purge(self, older_than_s: float = RETENTION_S) -> int:
        """Delete every entry and kept list not written for ``older_than_s``; how many (all accounts at once).

        An entry must outlive every job older than the action it records (a job is retried for
        minutes and redelivered a few times); past that it only takes room. A list whose job was
        poisoned is left behind the same way.
        """
        cutoff = docs.iso_time(datetime.fromtimestamp(self._clock() - older_than_s, UTC))
        try:
            self._engine.refresh([self._index])        # delete_by_query sees refreshed documents only
            answer = self._engine.delete_by_query(self._index, {"range": {"updated_at": {"lt": cutoff}}},
                                                  routing=None, timeout_s=600.0)
        except EngineError as exc:
            if exc.index_missing:
                return 0
            _raise("action ledger purge", exc)
        if answer.get("failures"):
            raise StoreUnavailable("action ledger purge: some deletions failed; the next one retries",
                                   retry_after_s=60.0)
        return int(answer.get("deleted", 0))

    @classmethod
    def of(cls, store: SearchStore) -> SearchActionLedger:
        """The ledger beside ``store``'s indices (same engine client, same prefix)."""
        return cls(store.engine, store.names)

    def _read(self, account_id: str, doc_ids: Sequence[str]
              ) -> Iterator[tuple[str, tuple[dict[str, Any], int, int] | None]]:
        for start in range(0, len(doc_ids), _MGET_CHUNK):
            chunk = list(doc_ids[start:start + _MGET_CHUNK])
            try:
                # The whole source: an entry is ~200 bytes, and naming its fields made the node filter each
                # one (an mget of 500 took 0.5-0.8 s with them, 40-90 ms without: SearchEngine.mget).
                entries = self._engine.mget(self._index, chunk, routing=account_id)
            except EngineError as exc:
                _raise("action ledger read", exc)
            for entry in entries:
                doc_id = str(entry.get("_id"))
                if "error" in entry:
                    # A multi-get answers a missing index (a lost store) or a failed shard per document, not
                    # for the request; read as "no entry", a claim would be refused for good and a release
                    # would drop its put-back.
                    raise _unavailable("action ledger read", *error_parts(entry))
                source = entry.get("_source") or {}
                if not entry.get("found") or source.get("account_id") != account_id:
                    yield doc_id, None
                else:
                    yield doc_id, (source, int(entry["_seq_no"]), int(entry["_primary_term"]))

    # --- bulk action lists: one job names one, instead of a job per 16 kB of ids -----------------------

    @staticmethod
    def _batch_doc_id(account_id: str, batch_id: str) -> str:
        # No message document id starts like this: account ids never hold a ':'.
        return f"batch:{docs.check_account_id(account_id)}:{batch_id}"

    def put_batch(self, account_id: str, actions: str) -> str:
        """Keep an ACTION job's action list (``encode_actions`` text); its id, for the job to name."""
        batch_id = uuid.uuid4().hex
        try:
            self._engine.index_document(self._index, self._batch_doc_id(account_id, batch_id), routing=account_id,
                                        document={"account_id": account_id, "updated_at": self._iso(self._clock()),
                                                  "batch": {"actions": actions}})
        except EngineError as exc:
            _raise("action ledger: keep a batch", exc)
        return batch_id

    def get_batch(self, account_id: str, batch_id: str) -> str | None:
        """The list kept as ``batch_id``; None once dropped (a job redelivered after it finished)."""
        try:
            source = self._engine.get_document(self._index, self._batch_doc_id(account_id, batch_id),
                                               routing=account_id)
        except EngineError as exc:
            _raise("action ledger: read a batch", exc)
        if source is None or source.get("account_id") != account_id:
            return None
        actions = (source.get("batch") or {}).get("actions")
        return actions if isinstance(actions, str) else None

    def drop_batch(self, account_id: str, batch_id: str) -> None:
        try:
            self._engine.delete_document(self._index, self._batch_doc_id(account_id, batch_id), routing=account_id)
        except EngineError as exc:
            _raise("action ledger: drop a batch", exc)

    def latest(self, account_id: str, message_ids: Sequence[str]) -> dict[str, LatestActions]:
        """The ledger entries of those messages that have one (realtime: a claim just made is seen)."""
        if not message_ids:
            return {}
        ids = {docs.message_doc_id(account_id, m): m for m in message_ids}
        found: dict[str, LatestActions] = {}
        for doc_id, read in self._read(account_id, list(ids)):
            if read is not None:
                found[ids[doc_id]] = entry_from_source(read[0])
        return found

    def claim(self, account_id: str, claims: Sequence[ActionClaim]) -> dict[str, Claimed]:
        """Record each claim as the latest action on its fields; its number and what it took over, by message id.

        A message named twice gets one number for the last of its claims (the
        service never sends that; bulk ids are deduplicated).
        """
        pending = {docs.message_doc_id(account_id, c.message_id): c for c in claims}
        seqs: dict[str, Claimed] = {}
        for round_ in range(CLAIM_ROUNDS):
            if not pending:
                return seqs
            if round_:
                # Lost a race: wait a little, randomly, so contenders do not collide again in lockstep.
                time.sleep(random.uniform(0.0, min(0.5, 0.01 * 2 ** round_)))
            now = self._clock()
            now_ms = int(now * 1000)
            updated_at = self._iso(now)
            lines: list[bytes] = []
            planned: list[tuple[str, Claimed]] = []
            for doc_id, read in self._read(account_id, list(pending)):
                claim = pending[doc_id]
                source, seq_no, primary_term = read if read is not None else ({}, -1, -1)
                seq = max(int(source.get("seq") or 0) + 1, now_ms)
                found = entry_from_source(source).fields
                prior = {name: found[name] for name in claim.fields if name in found}
                doc = {k: v for k, v in source.items() if k in ("account_id", "message_id", "seq")
                       or k in FIELDS or k.endswith("_seq")}
                doc.update(account_id=account_id, message_id=claim.message_id, seq=seq, updated_at=updated_at)
                for name, value in claim.fields.items():
                    doc[name], doc[f"{name}_seq"] = value, seq
                meta: dict[str, Any] = {"_index": self._index, "_id": doc_id, "routing": account_id}
                if read is None:
                    op = "create"
                else:
                    op = "index"
                    meta.update(if_seq_no=seq_no, if_primary_term=primary_term)
                lines.append(orjson.dumps({op: meta}) + b"\n" + orjson.dumps(doc) + b"\n")
                planned.append((doc_id, Claimed(seq=seq, prior=prior)))
            written = self._send_conditional(lines, "action ledger claim")
            for (doc_id, claimed), ok in zip(planned, written, strict=True):
                if ok:                  # else another claim won the race: read it and number after it
                    seqs[pending.pop(doc_id).message_id] = claimed
        if not pending:
            return seqs
        raise StoreUnavailable(f"action ledger claim: {len(pending)} message(s) still contended", retry_after_s=1.0)

    def _send_conditional(self, lines: list[bytes], what: str) -> list[bool]:
        """One ``_bulk`` of conditional writes (``create`` / ``index`` with ``if_seq_no``): per line, written
        (True) or lost a race to a write landing since the read (409, False). Any other refusal raises:
        429 / 5xx as ``StoreUnavailable`` (retry later), the rest as ``StoreError``."""
        try:
            answer = self._engine.bulk(b"".join(lines))
        except EngineError as exc:
            _raise(what, exc)
        items = answer.get("items") or []
        if len(items) != len(lines):
            raise StoreUnavailable(f"{what}: the store answered for fewer items than sent", retry_after_s=5.0)
        written: list[bool] = []
        for item in items:
            result = next(iter(item.values()))
            status = int(result.get("status", 500))
            error_type, reason = error_parts(result)
            if status == 429 or status >= 500 or error_type == "index_not_found_exception":
                raise _unavailable(what, error_type, reason)
            if status != 409 and not 200 <= status < 300:
                raise StoreError(f"{what} refused: {status} {error_type} {short_reason(reason)}".strip())
            written.append(status != 409)
        return written

    def release(self, account_id: str, claimed: Mapping[str, Claimed]) -> None:
        """Put back what each claim took over, on the fields still at its number (see ``ActionLedger``).

        Read, decide, write with ``if_seq_no`` like ``claim``: a claim landing in between makes the write
        fail (409) and the entry is read and decided again. The message's ``seq`` stays: numbers are never
        handed out twice. Only the claim's own fields are touched, so a newer claim on another field and
        a claim already released are left as they are.
        """
        pending = {docs.message_doc_id(account_id, m): c for m, c in claimed.items()}
        for round_ in range(CLAIM_ROUNDS):
            if not pending:
                return
            if round_:
                time.sleep(random.uniform(0.0, min(0.5, 0.01 * 2 ** round_)))
            lines: list[bytes] = []
            sent: list[str] = []
            for doc_id, read in self._read(account_id, list(pending)):
                if read is None:
                    pending.pop(doc_id)          # purged or the account deleted: nothing claims anything
                    continue
                source, seq_no, primary_term = read
                claim = pending[doc_id]
                doc = dict(source)
                changed = False
                for name in FIELDS:
                    if source.get(f"{name}_seq") != claim.seq:
                        continue
                    changed = True
                    if name in claim.prior:
                        doc[f"{name}_seq"], doc[name] = claim.prior[name]
                    else:
                        doc.pop(f"{name}_seq", None)
                        doc.pop(name, None)
                if not changed:
                    pending.pop(doc_id)
                    continue
                doc["updated_at"] = self._iso(self._clock())
                meta = {"_index": self._index, "_id": doc_id, "routing": account_id, "if_seq_no": seq_no,
                        "if_primary_term": primary_term}
                lines.append(orjson.dumps({"index": meta}) + b"\n" + orjson.dumps(doc) + b"\n")
                sent.append(doc_id)
            if not lines:
                return
            written = self._send_conditional(lines, "action ledger release")
            for doc_id, ok in zip(sent, written, strict=True):
                if ok:                  # else a claim landed meanwhile: read and decide again
                    pending.pop(doc_id)
        if pending:
            raise StoreUnavailable(f"action ledger release: {len(pending)} message(s) still contended",
                                   retry_after_s=1.0)


if TYPE_CHECKING:   # mypy proves the adapter implements the port
    def _implements_port(ledger: SearchActionLedger) -> ActionLedger:
        return ledger
