"""A mailbox's request slots: at most N Graph requests in flight per mailbox, and who waits on them.

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

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode

from mailsync.errors import DependencyUnavailable
from mailsync.storage.folder_leases import FolderLeases, dirty_when_taken
from mailsync.storage.sync_rows import (
    FOLDER_LIST_ROW,
    PENDING_ROW,
    SLOT_ROW_PREFIX,
    AccountSyncState,
    Lease,
    Released,
    Slot,
    SlotRow,
    apply_fields,
    check_partition,
    delivery_of,
    folder_row_key,
    slot_row_from_entity,
    to_entity_fields,
)
from mailsync.storage.sync_table_access import CONFLICT_RETRIES, merge_if_unchanged


class MailboxSlots(FolderLeases):
    """Taking and giving back request slots, alone or with a folder's lease (module docstring)."""

    def acquire_slot(self, account_id: str, owner: str, max_slots: int, *,
                     known: AccountSyncState | None = None) -> Slot | None:
        """Take one of the mailbox's ``max_slots`` request slots, or None when all are busy.

        ``known``: the account's rows as the caller just loaded them; the
        first attempt picks a slot from those instead of querying again (the
        take is ETag-conditional, so a stale copy only costs a retry).
        """
        partition = check_partition(account_id)
        for attempt in range(CONFLICT_RETRIES):
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
            operations.append(("create", body) if taken is None else merge_if_unchanged(body, taken.etag))
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
        if row is None or row.etag is None or (row.leased(now) and delivery_of(row.lease_owner) != delivery_of(owner)):
            return None
        candidate = _free_slot({slot.index: slot for slot in known.slots}, owner, max_slots, now)
        if candidate is None:
            return None
        index, taken = candidate
        partition = check_partition(known.account_id)
        slot_body = {"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{index}", "owner": owner,
                     "until": now + self._slot_ttl_s}
        until = now + self._lease_s
        dirty = dirty_when_taken(row, news)
        lease_fields = {"lease_owner": owner, "lease_until": until, "dirty": dirty}
        lease_entity = {**to_entity_fields(lease_fields), "PartitionKey": partition, "RowKey": row.row_key,
                        "updated_at": now}
        operations: list[Any] = [
            ("create", slot_body) if taken is None else merge_if_unchanged(slot_body, taken.etag),
            merge_if_unchanged(lease_entity, row.etag),
        ]
        if take_pending is not None:
            operations.append(("delete", {"PartitionKey": partition, "RowKey": PENDING_ROW},
                               {"etag": take_pending, "match_condition": MatchConditions.IfNotModified}))
        results = self._transaction(operations)
        if results is None:
            return None
        slot = Slot(known.account_id, index, owner, str(results[0].get("etag")))
        lease = Lease(replace(row, lease_owner=owner, lease_until=until, dirty=dirty,
                              etag=str(results[1].get("etag")), updated_at=now), owner, from_known=True)
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
            merge_if_unchanged({**to_entity_fields(fields), "PartitionKey": partition,
                                 "RowKey": lease.state.row_key, "updated_at": now}, lease.state.etag),
            merge_if_unchanged({"PartitionKey": partition, "RowKey": f"{SLOT_ROW_PREFIX}{slot.index}", "owner": "",
                                 "until": 0.0}, slot.etag),
        ]
        results = self._transaction(operations)
        if results is None:
            return self.finish(lease, **changes), None
        return None, Released(apply_fields(lease.state, fields, str(results[0].get("etag")), now),
                              SlotRow(slot.index, "", 0.0, str(results[1].get("etag"))))

    def release_slot(self, slot: Slot) -> None:
        """Give the slot back. A slot whose row changed since we took it (a job signalled waiting on it:
        ``mark_waiting``) is re-read and given back if it is still ours; expired and taken over, or the
        account deleted, there is nothing to give back."""
        partition = check_partition(slot.account_id)
        key = f"{SLOT_ROW_PREFIX}{slot.index}"
        etag = slot.etag
        for _ in range(CONFLICT_RETRIES):
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


def _free_slot(rows: Mapping[int, SlotRow], owner: str, max_slots: int,
               now: float) -> tuple[int, SlotRow | None] | None:
    """The slot to take (its index, and its row if it exists), or None when every one is busy."""
    candidate: tuple[int, SlotRow | None] | None = None
    for index in range(max_slots):
        row = rows.get(index)
        if row is None:
            candidate = candidate or (index, None)
            continue
        if row.owner and delivery_of(row.owner) == delivery_of(owner):
            return index, row   # our own earlier delivery died holding it
        if not row.owner or row.until <= now:
            candidate = candidate or (index, row)
    return candidate
