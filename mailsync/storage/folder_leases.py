"""A folder row's lease and ``dirty`` mark: one worker pages a folder at a time, and no change is missed.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from azure.core.exceptions import (
    ResourceModifiedError,
    ResourceNotFoundError,
)

from mailsync.errors import DependencyUnavailable, LeaseLost
from mailsync.storage.sync_rows import (
    Lease,
    SyncState,
    apply_fields,
    check_partition,
    delivery_of,
    to_entity_fields,
)
from mailsync.storage.sync_table_access import BATCH_MAX, CONFLICT_RETRIES, SyncTableAccess, merge_if_unchanged

# Fields only the lease holder writes; others merge dirty/resync/info fields.
_HOLDER_FIELDS = frozenset({
    "cursor", "phase", "epoch", "generation", "indexed", "removed", "failures",
    "rounds", "first_screen", "round_started", "resync_requested", "mid_round",
})


class FolderLeases(SyncTableAccess):
    """Taking, saving, ending and giving back folder leases (module docstring)."""

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
        for attempt in range(CONFLICT_RETRIES):
            state = known if attempt == 0 and known is not None else self.get(account_id, folder_id)
            if state is None:
                raise LeaseLost("no sync state for this folder")
            now = self._clock()
            if state.leased(now) and delivery_of(state.lease_owner) != delivery_of(owner):
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
            dirty = dirty_when_taken(state, mark_busy if news is None else news)
            fields: dict[str, Any] = {"lease_owner": owner, "lease_until": until, "dirty": dirty}
            try:
                etag = self._merge(state, fields)
            except ResourceModifiedError:
                continue
            except ResourceNotFoundError as exc:
                raise LeaseLost("sync state deleted") from exc
            return Lease(replace(state, lease_owner=owner, lease_until=until, dirty=dirty,
                                 etag=etag, updated_at=now), owner, from_known=state is known)
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
        for _ in range(CONFLICT_RETRIES):
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
        for _ in range(CONFLICT_RETRIES):
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
        for start in range(0, len(rows), BATCH_MAX):
            chunk = rows[start:start + BATCH_MAX]
            operations: list[Any] = [
                merge_if_unchanged({**to_entity_fields(fields), "PartitionKey": partition, "RowKey": row.row_key,
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
        for start in range(0, len(ends), BATCH_MAX):
            chunk = ends[start:start + BATCH_MAX]
            operations: list[Any] = []
            for lease, changes in chunk:
                unknown = set(changes) - _HOLDER_FIELDS
                if unknown:
                    raise ValueError(f"not holder fields: {sorted(unknown)}")
                if lease.state.account_id != ends[0][0].state.account_id:
                    raise ValueError("release_many takes the leases of one account (one partition)")
                fields = {**changes, "lease_owner": "", "lease_until": 0.0}
                operations.append(merge_if_unchanged(
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
        for _ in range(CONFLICT_RETRIES):
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
        for start in range(0, len(quiet), BATCH_MAX):
            chunk = quiet[start:start + BATCH_MAX]
            now = self._clock()
            operations: list[Any] = [
                merge_if_unchanged({**to_entity_fields(_rested(state, cursor)), "PartitionKey": partition,
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


def _rested(state: SyncState, cursor: str) -> dict[str, Any]:
    """The fields ``rest_quiet`` writes: what ``finish`` writes for a quiet incremental round."""
    return {"cursor": cursor, "rounds": state.rounds + 1, "dirty": False, "failures": 0, "mid_round": False}


def dirty_when_taken(state: SyncState, news: bool) -> bool:
    """``dirty`` as a new holder takes the row (``acquire``, ``take_slot_and_lease``).

    Between rounds the round this holder starts sees every change made so far:
    clear. In mid-round it does not (module docstring): the mark stays for
    ``finish``, and a job that comes with news (a notification, a poll) sets
    it, as it would on a leased row.
    """
    return state.mid_round and (state.dirty or news)
