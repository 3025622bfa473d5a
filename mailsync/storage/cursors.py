"""Sync state in Azure Tables: folder cursors, leases, dirty flags, and mailbox slots.

One table (``<prefix>sync``), one partition per account, so every account's
state is a handful of rows that one query returns:

===================  ===============================================================
RowKey               what it holds
===================  ===============================================================
``folders``          the folder-list cursor (same fields as a folder row)
``f:<folder id>``    one folder: opaque provider cursor, phase, epoch, counts,
                     dirty / resync flags, lease (owner + until), back-off
``slot:<n>``         one of the mailbox's request slots (owner + until)
``pending``          the account's notifications awaiting their NOTIFIED job, written by
                     the webhook (``mailsync.storage.subscriptions.TablePendingStore``):
                     here so the job reads it with the rows its first round needs
===================  ===============================================================

Nothing here is written per email: a folder row changes once per page of
changes (the cursor save, which also renews the lease), a slot twice per
worker invocation.

Leases (one worker pages a folder at a time)
--------------------------------------------
``acquire`` takes the lease with an ETag-conditional merge when it is free,
expired, or held by an earlier delivery of the same queue message (the host
redelivers a message whose worker died; that delivery may take over at
once instead of waiting for the lease to lapse). When another worker holds
it, ``acquire`` sets ``dirty`` — conditionally on the ETag it read, so a
release racing with it is noticed and the folder taken instead — and
returns ``None``. The holder saves progress with ETag-conditional merges of
only the fields it owns; a 412 means someone else wrote the row: if the
lease is still ours (someone set ``dirty`` or ``resync``), the merge is
simply re-sent on the fresh ETag, otherwise ``LeaseLost``. ``finish`` ends a
round: if ``dirty`` was set meanwhile it clears it and hands the lease back
for one more round, else it releases. So a change that arrives while a
folder is being paged is always followed by a round that starts after it.

A round can outlast its invocation (time budget, back-off, a dead worker):
the next holder goes on from the saved page link, and what the rest of
that round returns was fixed when the round *began* (Graph's delta, like
IMAP's CONDSTORE bound, pages a snapshot). So ``acquire`` clears ``dirty``
only on a row between rounds; on a row in mid-round (``mid_round``: the
cursor ``save`` wrote is a page link, not a round's final link) the mark
stays until ``finish``, which then runs the round it asked for. Clearing it
there lost a change made during a large folder's initial round until the
next poll (hours).

Slots (at most N Graph requests in flight per mailbox)
------------------------------------------------------
A worker pages sequentially, one request in flight at a time, so "at most 4
requests per mailbox" is "at most 4 workers per mailbox": a worker takes one
of ``max_slots`` slot rows for its invocation (with a TTL, so a killed worker
frees its slot) and gives it back at the end. Two table writes per
invocation instead of two per request; for a one-round invocation (a
notified round) the slot and the folder's lease are taken in one
entity-group transaction (``take_slot_and_lease``) and given back in another
(``finish_and_release_slot``): the rows share the account's partition.

A job that finds every slot busy leaves its intent on its row (``dirty``)
for whoever holds a slot, then looks at the slots once more and ends. Its
mark and a signal to every slot (a merge into each slot row, which changes
its ETag) are one transaction (``mark_waiting``). So a holder learns whether
anyone waited on it from its own slot: a conditional release that goes
through means nobody signalled since its take, and a notified round whose
slot and lease were taken from the rows it had read, and given back
together, ends from those rows without reading them again (a signal older
than that read came with a mark the read shows). A refused release means
someone may be waiting: the holder reads the rows and continues what is
pending. Whoever gave its slot back before the signal left it free for the
waiter's second look.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, UpdateMode

from mailsync.errors import DependencyUnavailable, LeaseLost, PendingChanged
from mailsync.storage.rest.table import RestTable
from mailsync.storage.sync_rows import (
    FOLDER_LIST_ROW,
    FOLDER_ROW_PREFIX,
    PENDING_ROW,
    SLOT_ROW_PREFIX,
    AccountSyncState,
    Lease,
    Released,
    Slot,
    SlotRow,
    SyncState,
    all_fields,
    apply_fields,
    check_partition,
    delivery_of,
    folder_row_key,
    from_entity,
    slot_row_from_entity,
    to_entity,
    to_entity_fields,
)

log = logging.getLogger("mailsync.cursors")

_CONFLICT_RETRIES = 20
_BATCH_MAX = 100   # operations per entity-group transaction (Azure Tables' limit)

# Fields only the lease holder writes; others merge dirty/resync/info fields.
_HOLDER_FIELDS = frozenset({
    "cursor", "phase", "epoch", "generation", "indexed", "removed", "failures",
    "rounds", "first_screen", "round_started", "resync_requested", "mid_round",
})

# Above this many folders, ``epochs`` reads the account's partition in one query instead of a row each.
POINT_READS_UP_TO = 2
_delivery = delivery_of


class SyncStateTable:
    """The cursor/lease/slot table. Thread-safe (the table client is)."""

    def __init__(self, table: RestTable, *, lease_s: float = 300.0, slot_ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._lease_s = lease_s
        self._slot_ttl_s = slot_ttl_s
        self._clock = clock

    @property
    def lease_s(self) -> float:
        return self._lease_s

    def ensure_table(self) -> None:
        try:
            self._table.create_table()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc

    # --- reads -------------------------------------------------------------

    def epochs(self, account_id: str, folder_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Each folder's current epoch: what a row written outside the engine (a user action's) carries.

        ``folder_ids``: only those, one point read each when there are at most ``POINT_READS_UP_TO`` (a
        PATCH writes one folder; the whole partition holds every folder's row and the slots); more (a bulk
        action's rows span a dozen folders), or None: every folder, in one partition query. The point reads
        went one after another: 11 folders were 11 round trips, 0.35-0.7 s at load ~26, twice per bulk action.
        """
        if folder_ids is None or len(folder_ids) > POINT_READS_UP_TO:
            wanted = None if folder_ids is None else set(folder_ids)
            return {folder_id: row.epoch for folder_id, row in self.load(account_id).folders.items()
                    if wanted is None or folder_id in wanted}
        rows = {folder_id: self.get(account_id, folder_id) for folder_id in folder_ids}
        return {folder_id: row.epoch for folder_id, row in rows.items() if row is not None}

    def load(self, account_id: str) -> AccountSyncState:
        """All of an account's rows (one partition query)."""
        now = self._clock()
        folder_list: SyncState | None = None
        folders: dict[str, SyncState] = {}
        busy = 0
        slots: list[SlotRow] = []
        others: dict[str, Mapping[str, Any]] = {}
        for entity in self._query(account_id):
            key = entity["RowKey"]
            if key.startswith(SLOT_ROW_PREFIX):
                if entity.get("owner") and float(entity.get("until") or 0.0) > now:
                    busy += 1
                slot = slot_row_from_entity(entity)
                if slot is not None:
                    slots.append(slot)
            elif key == FOLDER_LIST_ROW:
                folder_list = from_entity(entity)
            elif key.startswith(FOLDER_ROW_PREFIX):
                state = from_entity(entity)
                if state.folder_id is not None:
                    folders[state.folder_id] = state
            else:
                others[key] = entity
        return AccountSyncState(account_id, folder_list, folders, busy, tuple(slots), others)

    def get(self, account_id: str, folder_id: str | None) -> SyncState | None:
        key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
        try:
            entity = self._call(self._table.get_entity, check_partition(account_id), key)
        except ResourceNotFoundError:
            return None
        return from_entity(entity)

    # --- rows without a lease ------------------------------------------------

    def create(self, state: SyncState) -> SyncState:
        """Insert a row if it does not exist; return the stored row either way."""
        entity = to_entity(state, set(all_fields()))
        entity["PartitionKey"] = check_partition(state.account_id)
        entity["RowKey"] = state.row_key
        entity["updated_at"] = self._clock()
        try:
            meta = self._call(self._table.create_entity, entity)
        except ResourceExistsError:
            existing = self.get(state.account_id, state.folder_id)
            if existing is None:  # deleted between the two calls: try once more
                return self.create(state)
            return existing
        return replace(state, etag=meta.get("etag"), updated_at=entity["updated_at"])

    def create_many(self, states: Sequence[SyncState]) -> None:
        """Insert new rows of one account, up to 100 per entity-group transaction (one billed call each).

        Onboarding creates a row per folder; one batch instead of one call per
        folder. A batch is all-or-nothing: when any row already exists (a
        redelivered job created some), the batch is refused whole and the rows
        go one by one through ``create``, which keeps what is there.
        """
        if not states:
            return
        partition = check_partition(states[0].account_id)
        if any(state.account_id != states[0].account_id for state in states):
            raise ValueError("create_many takes the rows of one account (one partition)")
        now = self._clock()
        for start in range(0, len(states), _BATCH_MAX):
            chunk = states[start:start + _BATCH_MAX]
            operations: list[Any] = []
            for state in chunk:
                entity = to_entity(state, set(all_fields()))
                entity.update(PartitionKey=partition, RowKey=state.row_key, updated_at=now)
                operations.append(("create", entity))
            try:
                self._call(self._table.submit_transaction, operations)
            except (TableTransactionError, ResourceExistsError):
                for state in chunk:
                    self.create(state)

    def update_info(self, account_id: str, folder_id: str, *, name: str, role: str | None,
                    expected: int | None, parent_id: str | None = None, unread: int | None = None,
                    children: int | None = None) -> bool:
        """Refresh a folder's display fields (no lease needed; they are not the holder's)."""
        fields: dict[str, Any] = {"name": name, "role": role, "expected": expected, "parent_id": parent_id,
                                  "unread": unread, "children": children}
        return self._merge_unconditional(account_id, folder_row_key(folder_id), fields)

    def update_info_many(self, account_id: str, infos: Sequence[Mapping[str, Any]]) -> None:
        """``update_info`` for several folders of one account (each a mapping with ``folder_id`` and the
        fields ``update_info`` takes), up to 100 per entity-group transaction. A transaction refused (a
        row gone: a folder removed meanwhile) is written row by row, which skips the missing ones."""
        partition = check_partition(account_id)
        allowed = {"name", "role", "expected", "parent_id", "unread", "children"}
        rows: list[tuple[str, dict[str, Any]]] = []
        for info in infos:
            fields = {k: v for k, v in info.items() if k != "folder_id"}
            if set(fields) - allowed:
                raise ValueError(f"not display fields: {sorted(set(fields) - allowed)}")
            rows.append((folder_row_key(str(info["folder_id"])), fields))
        for start in range(0, len(rows), _BATCH_MAX):
            chunk = rows[start:start + _BATCH_MAX]
            now = self._clock()
            operations: list[Any] = [
                ("update", {**to_entity_fields(fields), "PartitionKey": partition, "RowKey": key, "updated_at": now},
                 {"mode": UpdateMode.MERGE}) for key, fields in chunk]
            if self._transaction(operations) is None:
                for key, fields in chunk:
                    self._merge_unconditional(account_id, key, fields)

    def mark(self, account_id: str, folder_id: str | None, *, dirty: bool = True,
             resync: bool = False, not_before: float | None = None) -> bool:
        """Record that a row needs another round (and maybe a resync). False when the row is gone."""
        fields: dict[str, Any] = {}
        if dirty:
            fields["dirty"] = True
        if resync:
            fields["resync_requested"] = True
        if not_before is not None:
            fields["not_before"] = float(not_before)
        key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
        return self._merge_unconditional(account_id, key, fields)

    def mark_many(self, account_id: str, folder_ids: Sequence[str | None], *, dirty: bool = True,
                  resync: bool = False) -> None:
        """``mark`` several rows of one account, up to 100 per entity-group transaction.

        A batch is all-or-nothing: when a row is gone (a folder deleted
        meanwhile) the batch is refused and its rows are marked one by one.
        """
        partition = check_partition(account_id)
        fields: dict[str, Any] = {}
        if dirty:
            fields["dirty"] = True
        if resync:
            fields["resync_requested"] = True
        if not fields:
            return
        keys = [FOLDER_LIST_ROW if fid is None else folder_row_key(fid) for fid in dict.fromkeys(folder_ids)]
        for start in range(0, len(keys), _BATCH_MAX):
            chunk = keys[start:start + _BATCH_MAX]
            now = self._clock()
            operations: list[Any] = [
                ("update", {**to_entity_fields(fields), "PartitionKey": partition, "RowKey": key, "updated_at": now},
                 {"mode": UpdateMode.MERGE}) for key in chunk]
            try:
                self._call(self._table.submit_transaction, operations)
            except (TableTransactionError, ResourceExistsError, ResourceNotFoundError):
                for key in chunk:
                    self._merge_unconditional(account_id, key, fields)

    def schedule_relook(self, account_id: str, folder_id: str | None, *, at: float,
                        slack_s: float = 1.0, known: SyncState | None = None) -> bool:
        """Claim the folder's pending look-again, due at ``at``; False when one due no more than
        ``slack_s`` earlier is pending already (notifications coalesce) or the folder is gone.

        A pending look-again due well before ``at`` does not cover the caller: it was
        scheduled for an earlier change and runs inside this change's delta lag, so it
        can find the earlier change, stop, and leave this one hidden until the next
        poll (a burst of 1,000 changes lost its last two that way). Then a later one is
        claimed too; during a burst that is at most one extra round per ``slack_s``.
        No lease needed: it is not the holder's field. ``known``: the row as the caller
        just read it (the claim is ETag-conditional, so a stale copy only costs a read)."""
        for attempt in range(_CONFLICT_RETRIES):
            state = known if attempt == 0 and known is not None else self.get(account_id, folder_id)
            if state is None or (state.relook_at > self._clock() and state.relook_at >= at - slack_s):
                return False
            try:
                self._merge(state, {"relook_at": float(at)})
            except ResourceModifiedError:
                continue
            except ResourceNotFoundError:
                return False
            return True
        return False

    def delete(self, account_id: str, folder_id: str | None) -> None:
        key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
        with contextlib.suppress(ResourceNotFoundError):
            self._call(self._table.delete_entity, check_partition(account_id), key)

    def delete_account(self, account_id: str) -> int:
        """Delete every sync row of an account (unlink). Returns how many were deleted."""
        count = 0
        for entity in self._query(account_id):
            try:
                self._call(self._table.delete_entity, entity["PartitionKey"], entity["RowKey"])
                count += 1
            except ResourceNotFoundError:
                pass
        return count

    # --- leases ---------------------------------------------------------------

    def acquire(self, account_id: str, folder_id: str | None, owner: str, *,
                mark_busy: bool = True, news: bool | None = None, known: SyncState | None = None) -> Lease | None:
        """Take a row's lease, or mark it dirty and return None when someone else holds it.

        ``mark_busy=False`` returns None without marking (a job that only
        continues pending work has nothing new to report). A job with news
        (``news``, by default ``mark_busy``) that takes a row in mid-round
        marks it too: the round it goes on with began before the news
        (module docstring). Raises
        ``LeaseLost`` when the row does not exist (folder deleted or unknown).
        ``known``: the row as the caller just read it (``load``); the first
        attempt decides on it instead of reading the row again. Every write
        is ETag-conditional, so a stale copy only costs a retry on a fresh read.
        """
        for attempt in range(_CONFLICT_RETRIES):
            state = known if attempt == 0 and known is not None else self.get(account_id, folder_id)
            if state is None:
                raise LeaseLost("no sync state for this folder")
            now = self._clock()
            if state.leased(now) and _delivery(state.lease_owner) != _delivery(owner):
                if state.dirty or not mark_busy:
                    return None
                try:
                    self._merge(state, {"dirty": True})
                    return None
                except ResourceModifiedError:
                    continue
                except ResourceNotFoundError as exc:
                    raise LeaseLost("sync state deleted") from exc
            until = now + self._lease_s
            dirty = _dirty_when_taken(state, mark_busy if news is None else news)
            fields: dict[str, Any] = {"lease_owner": owner, "lease_until": until, "dirty": dirty}
            try:
                etag = self._merge(state, fields)
            except ResourceModifiedError:
                continue
            except ResourceNotFoundError as exc:
                raise LeaseLost("sync state deleted") from exc
            return Lease(replace(state, lease_owner=owner, lease_until=until, dirty=dirty,
                                 etag=etag, updated_at=now), owner)
        raise DependencyUnavailable("sync state is too contended to lease", retry_after_s=1.0)

    def save(self, lease: Lease, **changes: Any) -> Lease:
        """Write holder fields (cursor, phase, counts...) and renew the lease.

        Conflicts from others' merges (dirty, resync, display fields) are
        absorbed; a lost lease or a deleted row raises ``LeaseLost``.
        """
        unknown = set(changes) - _HOLDER_FIELDS
        if unknown:
            raise ValueError(f"not holder fields: {sorted(unknown)}")
        now = self._clock()
        fields = dict(changes)
        if "cursor" in fields:
            # A cursor saved here is the link of the page just written: the round goes on from it.
            # "" starts a new round (the first request fixes what that round returns).
            fields["mid_round"] = bool(fields["cursor"])
        fields["lease_until"] = now + self._lease_s
        return self._write_held(lease, fields, now)

    def finish(self, lease: Lease, **changes: Any) -> Lease | None:
        """End a round: release, unless ``dirty`` was set meanwhile.

        Returns None when released; returns a renewed lease (dirty cleared)
        when the caller must run one more round first.
        """
        current = lease
        for _ in range(_CONFLICT_RETRIES):
            now = self._clock()
            if current.state.dirty:
                fields = dict(changes)
                fields.update(dirty=False, mid_round=False, lease_until=now + self._lease_s)
                return self._write_held(current, fields, now)
            fields = dict(changes)
            fields.update(lease_owner="", lease_until=0.0, mid_round=False)
            try:
                self._merge(current.state, fields)
                return None
            except ResourceModifiedError:
                current = self._reread(current)
            except ResourceNotFoundError as exc:
                raise LeaseLost("sync state deleted", code="folder_gone") from exc
        raise DependencyUnavailable("sync state is too contended to release", retry_after_s=1.0)

    def release(self, lease: Lease, **changes: Any) -> None:
        """Give the lease up now (time budget, back-off): ``dirty`` stays for whoever comes next."""
        current = lease
        for _ in range(_CONFLICT_RETRIES):
            fields = dict(changes)
            fields.update(lease_owner="", lease_until=0.0)
            try:
                self._merge(current.state, fields)
                return
            except ResourceModifiedError:
                current = self._reread(current)
            except ResourceNotFoundError as exc:
                raise LeaseLost("sync state deleted", code="folder_gone") from exc
        raise DependencyUnavailable("sync state is too contended to release", retry_after_s=1.0)

    def take_many(self, rows: Sequence[SyncState], owner: str, **changes: Any) -> list[Lease]:
        """Take the leases of several free rows of one account and write ``changes`` (holder fields) on
        each, in entity-group transactions of up to 100 rows (one billed call each).

        For a new account's first pass (``mailsync.sync.first_pass``): every
        row starts its first round at once, instead of an ``acquire`` and a
        ``save`` per folder. Each write is conditional on the ETag the caller
        read, as ``acquire``'s; the rows must be free and between rounds (a
        taken row's ``dirty`` is cleared, as ``acquire`` clears it there). A
        transaction refused (a row written since: marked, leased, deleted)
        takes none of its rows; they are left out of the answer, for the
        caller to work the ordinary way.
        """
        unknown = set(changes) - _HOLDER_FIELDS
        if unknown:
            raise ValueError(f"not holder fields: {sorted(unknown)}")
        if not rows:
            return []
        partition = check_partition(rows[0].account_id)
        if any(row.account_id != rows[0].account_id or row.folder_id is None or row.etag is None for row in rows):
            raise ValueError("take_many takes read folder rows of one account (one partition)")
        now = self._clock()
        fields = {**changes, "lease_owner": owner, "lease_until": now + self._lease_s, "dirty": False}
        if "cursor" in fields:
            fields["mid_round"] = bool(fields["cursor"])
        taken: list[Lease] = []
        for start in range(0, len(rows), _BATCH_MAX):
            chunk = rows[start:start + _BATCH_MAX]
            operations: list[Any] = [
                _merge_if_unchanged({**to_entity_fields(fields), "PartitionKey": partition, "RowKey": row.row_key,
                                     "updated_at": now}, row.etag)
                for row in chunk]
            results = self._transaction(operations)
            if results is None:
                continue
            taken.extend(Lease(apply_fields(row, fields, str(result.get("etag")), now), owner)
                         for row, result in zip(chunk, results, strict=True))
        return taken

    def release_many(self, ends: Sequence[tuple[Lease, Mapping[str, Any]]]) -> list[str]:
        """Give back several leases of one account, each with its last holder fields, in entity-group
        transactions of up to 100 rows; returns the folder ids whose rows were deleted meanwhile.

        Like ``release`` (not ``finish``): a ``dirty`` or ``resync`` mark set
        since the take stays on the row for whoever comes next. A transaction
        refused (such a mark changed a row's ETag, or a row is gone) writes
        nothing; its rows are then released one by one, which keeps the
        marks. A row another worker holds by then (our lease lapsed) is left
        to it: its round began after ours.
        """
        if not ends:
            return []
        partition = check_partition(ends[0][0].state.account_id)
        now = self._clock()
        gone: list[str] = []
        for start in range(0, len(ends), _BATCH_MAX):
            chunk = ends[start:start + _BATCH_MAX]
            operations: list[Any] = []
            for lease, changes in chunk:
                unknown = set(changes) - _HOLDER_FIELDS
                if unknown:
                    raise ValueError(f"not holder fields: {sorted(unknown)}")
                if lease.state.account_id != ends[0][0].state.account_id:
                    raise ValueError("release_many takes the leases of one account (one partition)")
                fields = {**changes, "lease_owner": "", "lease_until": 0.0}
                operations.append(_merge_if_unchanged(
                    {**to_entity_fields(fields), "PartitionKey": partition, "RowKey": lease.state.row_key,
                     "updated_at": now}, lease.state.etag))
            if self._transaction(operations) is not None:
                continue
            for lease, changes in chunk:
                try:
                    self.release(lease, **changes)
                except LeaseLost as lost:
                    if lost.code == "folder_gone" and lease.state.folder_id is not None:
                        gone.append(lease.state.folder_id)
        return gone

    def _write_held(self, lease: Lease, fields: dict[str, Any], now: float) -> Lease:
        current = lease
        for _ in range(_CONFLICT_RETRIES):
            try:
                etag = self._merge(current.state, fields)
            except ResourceModifiedError:
                current = self._reread(current)
                continue
            except ResourceNotFoundError as exc:
                raise LeaseLost("sync state deleted", code="folder_gone") from exc
            return Lease(apply_fields(current.state, fields, etag, now), current.owner)
        raise DependencyUnavailable("sync state is too contended to save", retry_after_s=1.0)

    def _reread(self, lease: Lease) -> Lease:
        fresh = self.get(lease.state.account_id, lease.state.folder_id)
        if fresh is None:
            raise LeaseLost("sync state deleted", code="folder_gone")
        if fresh.lease_owner != lease.owner:
            raise LeaseLost("another worker holds the folder now")
        return Lease(fresh, lease.owner)

    def rest_quiet(self, quiet: Sequence[tuple[SyncState, str]]) -> int:
        """End a sweep's quiet rounds without leases: per row, its new final cursor, one more round, ``dirty``
        cleared; up to 100 rows per entity-group transaction. Returns how many rows were written.

        ``quiet``: rows of one account as the caller read them, unleased, each
        with the cursor a read from its saved one returned, complete and empty
        (``mailsync.sync.quiet_sweep``). Every write is conditional on the ETag
        of that read: a row written since (leased, marked by a notification,
        finished by another round, deleted) is left as it is, for its own
        round. A transaction refused for one such row is redone row by row.
        """
        if not quiet:
            return 0
        account_id = quiet[0][0].account_id
        if any(state.account_id != account_id for state, _ in quiet):
            raise ValueError("rest_quiet takes the rows of one account (one partition)")
        partition = check_partition(account_id)
        written = 0
        for start in range(0, len(quiet), _BATCH_MAX):
            chunk = quiet[start:start + _BATCH_MAX]
            now = self._clock()
            operations: list[Any] = [
                _merge_if_unchanged({**to_entity_fields(_rested(state, cursor)), "PartitionKey": partition,
                                     "RowKey": state.row_key, "updated_at": now}, state.etag)
                for state, cursor in chunk]
            if self._transaction(operations) is not None:
                written += len(chunk)
                continue
            for state, cursor in chunk:
                with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
                    self._merge(state, _rested(state, cursor))
                    written += 1
        return written

    # --- slots ------------------------------------------------------------------

    def acquire_slot(self, account_id: str, owner: str, max_slots: int, *,
                     known: AccountSyncState | None = None) -> Slot | None:
        """Take one of the mailbox's ``max_slots`` request slots, or None when all are busy.

        ``known``: the account's rows as the caller just loaded them; the
        first attempt picks a slot from those instead of querying again (the
        take is ETag-conditional, so a stale copy only costs a retry).
        """
        partition = check_partition(account_id)
        for attempt in range(_CONFLICT_RETRIES):
            now = self._clock()
            if attempt == 0 and known is not None:
                rows = {row.index: row for row in known.slots}
            else:
                rows = self._slot_rows(account_id)
            candidate = _free_slot(rows, owner, max_slots, now)
            if candidate is None:
                if attempt == 0 and known is not None:
                    continue   # all busy in the caller's copy: look at the table itself once
                return None
            index, taken = candidate
            body = {"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{index}", "owner": owner,
                    "until": now + self._slot_ttl_s}
            try:
                if taken is None:
                    meta = self._call(self._table.create_entity, body)
                else:
                    meta = self._call(self._table.update_entity, body, mode=UpdateMode.MERGE,
                                      etag=taken.etag, match_condition=MatchConditions.IfNotModified)
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                continue
            return Slot(account_id, index, owner, str(meta.get("etag")))
        return None

    def _slot_rows(self, account_id: str) -> dict[int, SlotRow]:
        """The account's slot rows by index (one query of the ``slot:`` rows)."""
        rows = (slot_row_from_entity(found) for found in self._query(account_id, prefix=SLOT_ROW_PREFIX))
        return {row.index: row for row in rows if row is not None}

    def acquire_slots(self, account_id: str, owners: Sequence[str], max_slots: int) -> list[Slot]:
        """As many free slots as there are ``owners`` (one each, each owner its own delivery) or are free.

        For a bulk user action that fills the mailbox's slots: one query and one entity-group transaction
        (two round trips) instead of ``acquire_slot``'s two per slot, one slot after another. When the
        transaction is refused (a slot was taken or freed since the query: nothing was written), the slots
        are taken one by one, which decides races exactly as ``acquire_slot`` does.
        """
        partition = check_partition(account_id)
        rows = self._slot_rows(account_id)
        now = self._clock()
        free = [index for index in range(max_slots)
                if index not in rows or not rows[index].owner or rows[index].until <= now][:len(owners)]
        if not free:
            return []
        operations: list[Any] = []
        for index, owner in zip(free, owners, strict=False):
            body = {"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{index}", "owner": owner,
                    "until": now + self._slot_ttl_s}
            taken = rows.get(index)
            operations.append(("create", body) if taken is None else _merge_if_unchanged(body, taken.etag))
        results = self._transaction(operations)
        if results is not None:
            return [Slot(account_id, index, owner, str(result.get("etag")))
                    for index, owner, result in zip(free, owners, results, strict=False)]
        slots: list[Slot] = []
        for owner in owners:
            slot = self.acquire_slot(account_id, owner, max_slots)
            if slot is None:
                break
            slots.append(slot)
        return slots

    def take_pending(self, account_id: str, etag: str) -> None:
        """Delete the account's pending row if it is still as read (``etag``); ``PendingChanged`` when it
        changed (the caller must read it again). A row already gone is fine: someone took it."""
        try:
            self._call(self._table.delete_entity, check_partition(account_id), PENDING_ROW, etag=etag,
                       match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError as exc:
            raise PendingChanged("pending notifications changed since they were read") from exc
        except ResourceNotFoundError:
            pass

    def take_slot_and_lease(self, known: AccountSyncState, folder_id: str, owner: str,
                            max_slots: int, *, news: bool = True,
                            take_pending: str | None = None) -> tuple[Slot, Lease] | None:
        """A request slot and a folder's lease in one entity-group transaction (one partition: one call).

        The steady-state round takes both, one after the other, from the rows it
        has just loaded (``known``); they are rows of the same partition, so one
        transaction takes them together, each write ETag-conditional as
        ``acquire_slot`` and ``acquire`` make it. None when ``known`` shows no free
        slot or the folder leased by another delivery, or when the transaction is
        refused (someone wrote one of the rows since: nothing was written). The
        caller then takes them one by one, which decides busy slots and leases
        exactly as before (marking the folder dirty, re-reading a stale row).
        ``news``: the job comes with news for the folder (as ``acquire``'s).
        ``take_pending``: the ETag of the pending row, deleted in the same
        transaction (a NOTIFIED job's first round takes its notifications with
        its slot and lease); refused, nothing was taken either.
        """
        row = known.folders.get(folder_id)
        now = self._clock()
        if row is None or row.etag is None or (row.leased(now) and _delivery(row.lease_owner) != _delivery(owner)):
            return None
        candidate = _free_slot({slot.index: slot for slot in known.slots}, owner, max_slots, now)
        if candidate is None:
            return None
        index, taken = candidate
        partition = check_partition(known.account_id)
        slot_body = {"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{index}", "owner": owner,
                     "until": now + self._slot_ttl_s}
        until = now + self._lease_s
        dirty = _dirty_when_taken(row, news)
        lease_fields = {"lease_owner": owner, "lease_until": until, "dirty": dirty}
        lease_entity = {**to_entity_fields(lease_fields), "PartitionKey": partition, "RowKey": row.row_key,
                        "updated_at": now}
        operations: list[Any] = [
            ("create", slot_body) if taken is None else _merge_if_unchanged(slot_body, taken.etag),
            _merge_if_unchanged(lease_entity, row.etag),
        ]
        if take_pending is not None:
            operations.append(("delete", {"PartitionKey": partition, "RowKey": PENDING_ROW},
                               {"etag": take_pending, "match_condition": MatchConditions.IfNotModified}))
        results = self._transaction(operations)
        if results is None:
            return None
        slot = Slot(known.account_id, index, owner, str(results[0].get("etag")))
        lease = Lease(replace(row, lease_owner=owner, lease_until=until, dirty=dirty,
                              etag=str(results[1].get("etag")), updated_at=now), owner)
        return slot, lease

    def finish_and_release_slot(self, lease: Lease, slot: Slot,
                                **changes: Any) -> tuple[Lease | None, Released | None]:
        """``finish`` and ``release_slot`` in one entity-group transaction: (``finish``'s answer, what was released).

        For an invocation whose round is its last Graph work. The second value
        is the folder's row and the slot as the transaction left them (released,
        with their new ETags) when the slot went back with the lease: the slot's ETag was still
        the one our take got, so no job signalled waiting on the mailbox's slots
        meanwhile (``mark_waiting``) and the caller may end without reading the
        rows again. When the round must run again (``dirty`` set before our last
        write) or the transaction is refused (the row was written since:
        ``dirty``, ``resync``, a deletion; or the slot: a waiting job's signal, a
        takeover), nothing was written and it is plain ``finish``, whose conflict
        handling decides; the slot is then still held and the value None.
        """
        if lease.state.dirty:
            return self.finish(lease, **changes), None
        now = self._clock()
        fields = {**changes, "lease_owner": "", "lease_until": 0.0, "mid_round": False}
        partition = check_partition(lease.state.account_id)
        operations: list[Any] = [
            _merge_if_unchanged({**to_entity_fields(fields), "PartitionKey": partition,
                                 "RowKey": lease.state.row_key, "updated_at": now}, lease.state.etag),
            _merge_if_unchanged({"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{slot.index}", "owner": "",
                                 "until": 0.0}, slot.etag),
        ]
        results = self._transaction(operations)
        if results is None:
            return self.finish(lease, **changes), None
        return None, Released(apply_fields(lease.state, fields, str(results[0].get("etag")), now),
                              SlotRow(slot.index, "", 0.0, str(results[1].get("etag"))))

    def _transaction(self, operations: list[Any]) -> list[Mapping[str, Any]] | None:
        """Submit one entity-group transaction; None when the service refused it (a condition failed, a
        row exists or is gone: nothing was written). Other failures are ``DependencyUnavailable``."""
        try:
            return self._table.submit_transaction(operations)
        except TableTransactionError as exc:
            if exc.status_code in (404, 409, 412):
                return None
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except (ResourceNotFoundError, ResourceModifiedError, ResourceExistsError):
            return None
        except HttpResponseError as exc:
            if exc.status_code in (404, 409, 412):
                return None
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc

    def release_slot(self, slot: Slot) -> None:
        """Give the slot back. A slot whose row changed since we took it (a job signalled waiting on it:
        ``mark_waiting``) is re-read and given back if it is still ours; expired and taken over, or the
        account deleted, there is nothing to give back."""
        partition = check_partition(slot.account_id)
        key = f"{SLOT_ROW_PREFIX}{slot.index}"
        etag = slot.etag
        for _ in range(_CONFLICT_RETRIES):
            try:
                self._call(self._table.update_entity, {"PartitionKey": partition, "RowKey": key, "owner": "",
                                                       "until": 0.0},
                           mode=UpdateMode.MERGE, etag=etag, match_condition=MatchConditions.IfNotModified)
                return
            except ResourceNotFoundError:
                return
            except ResourceModifiedError:
                try:
                    entity = self._call(self._table.get_entity, partition, key)
                except ResourceNotFoundError:
                    return
                if entity.get("owner") != slot.owner:
                    return
                etag = str(entity.metadata["etag"])
        raise DependencyUnavailable("sync state is too contended to give a slot back", retry_after_s=1.0)

    def mark_waiting(self, account_id: str, folder_id: str | None, *, dirty: bool, max_slots: int) -> None:
        """A job that found every slot busy: mark its row (``dirty``) and signal every slot's holder.

        One entity-group transaction: the mark, and a merge into each of the
        ``max_slots`` slot rows (all exist: every one was busy), which changes
        their ETags. A holder whose slot was signalled finds its conditional
        release refused (``finish_and_release_slot``) and reads the rows before
        it ends, so it sees the mark; one that gave its slot back before the
        signal left it free for the caller's next look at the slots. So the
        caller may end after that look: the row is someone's to pick up.
        A row gone meanwhile refuses the batch: the writes go one by one.
        """
        partition = check_partition(account_id)
        now = self._clock()
        operations: list[Any] = []
        if dirty:
            key = FOLDER_LIST_ROW if folder_id is None else folder_row_key(folder_id)
            operations.append(("update", {"PartitionKey": partition, "RowKey": key, "dirty": True, "updated_at": now},
                               {"mode": UpdateMode.MERGE}))
        for index in range(max_slots):
            operations.append(("update", {"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{index}",
                                          "waiting": now}, {"mode": UpdateMode.MERGE}))
        if not operations or self._transaction(operations) is not None:
            return
        for _, entity, _options in operations:
            self._merge_unconditional(account_id, entity["RowKey"],
                                      {k: v for k, v in entity.items() if k not in ("PartitionKey", "RowKey")})

    # --- plumbing ------------------------------------------------------------------

    def _query(self, account_id: str, prefix: str | None = None) -> Iterable[Any]:
        partition = check_partition(account_id)
        try:
            return self._table.query_partition(partition, row_prefix=prefix)
        except ResourceNotFoundError:
            return []
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc

    def _merge(self, state: SyncState, fields: Mapping[str, Any]) -> str:
        entity = to_entity_fields(fields)
        entity["PartitionKey"] = check_partition(state.account_id)
        entity["RowKey"] = state.row_key
        entity["updated_at"] = self._clock()
        meta = self._call(self._table.update_entity, entity, mode=UpdateMode.MERGE, etag=state.etag,
                          match_condition=MatchConditions.IfNotModified)
        return str(meta.get("etag"))

    def _merge_unconditional(self, account_id: str, row_key: str, fields: Mapping[str, Any]) -> bool:
        entity = to_entity_fields(fields)
        entity["PartitionKey"] = check_partition(account_id)
        entity["RowKey"] = row_key
        entity["updated_at"] = self._clock()
        try:
            self._call(self._table.update_entity, entity, mode=UpdateMode.MERGE)
        except ResourceNotFoundError:
            return False
        return True

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (ResourceNotFoundError, ResourceModifiedError, ResourceExistsError):
            raise
        except TableTransactionError as exc:
            if exc.status_code in (404, 409):
                raise   # a row of the batch exists, or is gone: the caller decides
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except HttpResponseError as exc:
            if exc.status_code == 412:
                raise ResourceModifiedError(message=str(exc), response=exc.response) from exc
            if exc.status_code == 409:
                raise ResourceExistsError(message=str(exc), response=exc.response) from exc
            raise DependencyUnavailable(f"sync table error {exc.status_code}") from exc
        except AzureError as exc:
            raise DependencyUnavailable(f"sync table unavailable: {type(exc).__name__}") from exc


def _free_slot(rows: Mapping[int, SlotRow], owner: str, max_slots: int,
               now: float) -> tuple[int, SlotRow | None] | None:
    """The slot to take (its index, and its row if it exists), or None when every one is busy."""
    candidate: tuple[int, SlotRow | None] | None = None
    for index in range(max_slots):
        row = rows.get(index)
        if row is None:
            candidate = candidate or (index, None)
            continue
        if row.owner and _delivery(row.owner) == _delivery(owner):
            return index, row   # our own earlier delivery died holding it
        if not row.owner or row.until <= now:
            candidate = candidate or (index, row)
    return candidate


def _merge_if_unchanged(entity: dict[str, Any], etag: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A transaction's MERGE of ``entity``, only while the row still has ``etag``: a row written since makes
    the service refuse the whole transaction (412), which is how every batch here stays conditional."""
    return "update", entity, {"mode": UpdateMode.MERGE, "etag": etag, "match_condition": MatchConditions.IfNotModified}


def _rested(state: SyncState, cursor: str) -> dict[str, Any]:
    """The fields ``rest_quiet`` writes: what ``finish`` writes for a quiet incremental round."""
    return {"cursor": cursor, "rounds": state.rounds + 1, "dirty": False, "failures": 0, "mid_round": False}


def _dirty_when_taken(state: SyncState, news: bool) -> bool:
    """``dirty`` as a new holder takes the row (``acquire``, ``take_slot_and_lease``).

    Between rounds the round this holder starts sees every change made so far:
    clear. In mid-round it does not (module docstring): the mark stays for
    ``finish``, and a job that comes with news (a notification, a poll) sets
    it, as it would on a leased row.
    """
    return state.mid_round and (state.dirty or news)

