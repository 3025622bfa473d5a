"""Change-monitoring rows in Azure Tables: subscriptions, monitors, pending notifications.

Table ``<prefix>subscriptions``; every partition is one subscription or
one account, so none grows::

    PartitionKey = "s-<subscription id>"  RowKey = "subscription"  account, clientState hash, expiry
    PartitionKey = "a-<account id>"       RowKey = "monitor"       current me/messages subscription, failures
    PartitionKey = "a-<account id>"       RowKey = "monitor-folders"  the same for me/mailFolders

Pending notifications (``TablePendingStore``) live in the *sync* table, in
the account's partition (``PartitionKey = <account id>``, ``RowKey =
"pending"``), beside the rows of the account's folders and slots: the
NOTIFIED job reads the row with the same partition query that gives its
first folder round the rows it needs (``mailsync.storage.sync_table``), one
table call where there were two. (They lived here as ``a-<account id>`` /
``pending``; ``delete_monitor`` still removes such a row.)

The webhook's lookup by subscription id is a point read. The timers scan
the ``monitor`` rows (one per account; a full-table query filtered on the
RowKey — fine for a timer every few minutes, never done per request).

Keys the webhook receives come from the internet: anything that is not
shaped like an id we store is answered "unknown" without reaching the
table (a ``/`` or ``#`` in a key would otherwise become a different URL).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from mailsync.errors import Conflict
from mailsync.monitoring.records import (
    AccountMonitor,
    PendingChanges,
    PendingPart,
    Subscription,
    SubscriptionKind,
    fold_part,
)
from mailsync.storage.rest.table import RestTable
from mailsync.storage.sync_rows import PENDING_ROW, AccountSyncState
from mailsync.storage.table_errors import ensure_table, table_errors

SUBSCRIPTION_ROW = "subscription"
MONITOR_ROW = "monitor"
# The messages row keeps its original key, so rows written before folder subscriptions still read.
MONITOR_ROWS = {SubscriptionKind.MESSAGES: MONITOR_ROW, SubscriptionKind.FOLDERS: "monitor-folders"}
# A pending row's parts (TablePendingStore.add): properties of this prefix, one per request that found the row.
PART_PREFIX = "part_"
MAX_PART_CHARS = 30_000     # a string property holds 64 KiB (UTF-16): 32K characters, with room to spare
# Graph subscription ids are GUIDs; our account ids are hex. Both fit this.
_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _sub_key(subscription_id: str) -> str:
    return f"s-{subscription_id}"


def _account_key(account_id: str) -> str:
    return f"a-{account_id}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _required_time(value: Any) -> datetime:
    parsed = _time(value)
    if parsed is None:
        raise ValueError("a required time is missing from a monitoring row")
    return parsed


def _opt(entity: Mapping[str, Any], key: str) -> str | None:
    value = entity.get(key)
    return None if value is None or value == "" else str(value)


def _etag(entity: Any) -> str:
    return str(entity.metadata["etag"])


def valid_key(value: str) -> bool:
    return bool(_KEY.match(value))


class TableSubscriptionStore:
    """``SubscriptionStore`` on Azure Tables."""

    def __init__(self, table: RestTable) -> None:
        self._table = table

    def ensure_table(self) -> None:
        ensure_table(self._table)

    # -- subscriptions ----------------------------------------------------------------

    def get(self, subscription_id: str) -> Subscription | None:
        if not valid_key(subscription_id):
            return None
        with table_errors("reading a subscription"):
            try:
                entity = self._table.get_entity(_sub_key(subscription_id), SUBSCRIPTION_ROW)
            except ResourceNotFoundError:
                return None
        return Subscription(subscription_id=subscription_id, account_id=str(entity["account_id"]),
                            client_state_hash=str(entity["client_state_hash"]),
                            expires_at=_required_time(entity["expires_at"]),
                            created_at=_required_time(entity["created_at"]),
                            resource=str(entity.get("resource") or "me/messages"))

    def put(self, subscription: Subscription) -> None:
        if not valid_key(subscription.subscription_id):
            raise ValueError("subscription id is not a valid table key")
        entity = {"PartitionKey": _sub_key(subscription.subscription_id), "RowKey": SUBSCRIPTION_ROW,
                  "account_id": subscription.account_id, "client_state_hash": subscription.client_state_hash,
                  "expires_at": _iso(subscription.expires_at), "created_at": _iso(subscription.created_at),
                  "resource": subscription.resource}
        with table_errors("saving a subscription"):
            self._table.upsert_entity(entity, mode=UpdateMode.REPLACE)

    def delete(self, subscription_id: str) -> None:
        if not valid_key(subscription_id):
            return
        with table_errors("deleting a subscription"):
            self._table.delete_entity(_sub_key(subscription_id), SUBSCRIPTION_ROW)

    # -- monitors ---------------------------------------------------------------------

    def get_monitor(self, account_id: str,
                    kind: SubscriptionKind = SubscriptionKind.MESSAGES) -> AccountMonitor | None:
        if not valid_key(account_id):
            return None
        with table_errors("reading an account monitor"):
            try:
                entity = self._table.get_entity(_account_key(account_id), MONITOR_ROWS[kind])
            except ResourceNotFoundError:
                return None
        return _monitor(entity)

    def save_monitor(self, monitor: AccountMonitor) -> AccountMonitor:
        if not valid_key(monitor.account_id):
            raise ValueError("account id is not a valid table key")
        entity = {"PartitionKey": _account_key(monitor.account_id), "RowKey": MONITOR_ROWS[monitor.kind],
                  "account_id": monitor.account_id, "subscription_id": monitor.subscription_id or "",
                  "expires_at": _iso(monitor.expires_at), "failures": monitor.failures,
                  "last_error": monitor.last_error or "", "retry_at": _iso(monitor.retry_at),
                  "updated_at": _iso(monitor.updated_at)}
        with table_errors("saving an account monitor"):
            try:
                if monitor.etag is None:
                    meta = self._table.create_entity(entity)
                else:
                    meta = self._table.update_entity(entity, mode=UpdateMode.REPLACE, etag=monitor.etag,
                                                     match_condition=MatchConditions.IfNotModified)
            except ResourceExistsError as exc:
                raise Conflict("the account monitor already exists") from exc
            except (ResourceModifiedError, ResourceNotFoundError) as exc:
                raise Conflict("the account monitor changed concurrently") from exc
        return AccountMonitor(**{**monitor.__dict__, "etag": str(meta["etag"])})

    def delete_monitor(self, account_id: str) -> None:
        if not valid_key(account_id):
            return
        with table_errors("deleting an account monitor"):
            for row in MONITOR_ROWS.values():
                self._table.delete_entity(_account_key(account_id), row)
            self._table.delete_entity(_account_key(account_id), PENDING_ROW)   # where it lived before (docstring)

    def monitors(self) -> Iterator[AccountMonitor]:
        rows = list(MONITOR_ROWS.values())
        with table_errors("listing account monitors"):
            for entity in self._table.query_entities("RowKey eq @a or RowKey eq @b",
                                                     parameters={"a": rows[0], "b": rows[1]}):
                yield _monitor(entity)


def _monitor(entity: Any) -> AccountMonitor:
    kind = next(k for k, row in MONITOR_ROWS.items() if row == entity["RowKey"])
    return AccountMonitor(account_id=str(entity["account_id"]), subscription_id=_opt(entity, "subscription_id"),
                          expires_at=_time(entity.get("expires_at")), failures=int(entity.get("failures") or 0),
                          last_error=_opt(entity, "last_error"), retry_at=_time(entity.get("retry_at")),
                          updated_at=_time(entity.get("updated_at")), etag=_etag(entity), kind=kind)


class TablePendingStore:
    """``PendingStore`` on Azure Tables: the per-account coalescing gate (ETag concurrency).

    ``table`` is the sync table (``<prefix>sync``): the row shares the account's partition with
    its sync rows (the module docstring). ``max_ids``: ``Settings.notify_max_ids``, applied as
    parts are folded in.

    Parts (``add``): a request for an account whose row is pending writes its
    notifications as one more property of the row (``part_<time><nonce>``, JSON),
    with an unconditional merge: no read, no ETag, one write instead of a read and
    an ETag replace. The merge changes the row's ETag like any write, so the job's
    ETag-conditional take still notices it; it needs the row (``If-Match: *``), so a
    row taken meanwhile refuses it and the caller inserts a new one. Reading folds
    the parts in, in the order of their names; ``replace`` writes the folded row
    whole (a REPLACE drops every property it does not name). An entity holds at most
    252 properties and a string 64 KiB: a part too large, or one the service
    refuses, is a ``Conflict`` and the caller reads and replaces instead, which
    folds the parts away.
    """

    def __init__(self, table: RestTable, *, max_ids: int = 100) -> None:
        self._table = table
        self._max_ids = max_ids

    def get(self, account_id: str) -> PendingChanges | None:
        if not valid_key(account_id):
            return None
        with table_errors("reading pending notifications"):
            try:
                entity = self._table.get_entity(account_id, PENDING_ROW)
            except ResourceNotFoundError:
                return None
        return self._from_entity(account_id, entity)

    def from_rows(self, rows: AccountSyncState) -> PendingChanges | None:
        """The pending row among an account's sync rows, as one partition query read them."""
        entity = rows.others.get(PENDING_ROW)
        return None if entity is None else self._from_entity(rows.account_id, entity)

    def _from_entity(self, account_id: str, entity: Any) -> PendingChanges:
        changes = orjson.loads(entity.get("changes") or "[]")
        versions = orjson.loads(entity.get("versions") or "{}")
        folders = orjson.loads(entity.get("folders") or "{}")
        row = PendingChanges(account_id=account_id,
                             changes=tuple((str(ct), str(mid)) for ct, mid in changes),
                             all_folders=bool(entity.get("all_folders")),
                             first_at=_required_time(entity["first_at"]),
                             enqueued_at=_required_time(entity["enqueued_at"]), etag=_etag(entity),
                             folder_notices=int(entity.get("folder_notices") or 0),
                             versions=tuple((str(mid), str(tag)) for mid, tag in versions.items()),
                             last_at=_time(entity.get("last_at")),
                             folders=tuple((str(mid), str(folder)) for mid, folder in folders.items()))
        for name in sorted(key for key in entity if key.startswith(PART_PREFIX)):
            row = fold_part(row, _part_from_json(entity[name], _part_time(name)), max_ids=self._max_ids)
        return row

    def add(self, account_id: str, part: PendingPart) -> bool:
        if not valid_key(account_id):
            raise ValueError("account id is not a valid table key")
        value = orjson.dumps({"n": [list(item) for item in part.notified], "f": part.folder_notices,
                              "a": part.all_folders}).decode()
        if len(value) > MAX_PART_CHARS:
            raise Conflict("notifications too many for a part of the pending row")
        name = f"{PART_PREFIX}{time.time_ns():016x}{secrets.token_hex(4)}"
        with table_errors("adding to pending notifications"):
            try:
                # Unconditional MERGE: If-Match "*", so a missing row refuses it (404) instead of creating one.
                self._table.update_entity({"PartitionKey": account_id, "RowKey": PENDING_ROW, name: value},
                                          mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                return False
            except HttpResponseError as exc:
                if exc.status_code == 400:   # too many properties, or the entity too large: fold them
                    raise Conflict("the pending row cannot take another part") from exc
                raise
        return True

    def create(self, pending: PendingChanges) -> PendingChanges:
        with table_errors("saving pending notifications"):
            try:
                meta = self._table.create_entity(self._entity(pending))
            except ResourceExistsError as exc:
                raise Conflict("notifications are already pending") from exc
        return PendingChanges(**{**pending.__dict__, "etag": str(meta["etag"])})

    def replace(self, pending: PendingChanges) -> PendingChanges:
        if pending.etag is None:
            raise ValueError("replace needs the etag the row was read with")
        with table_errors("saving pending notifications"):
            try:
                meta = self._table.update_entity(self._entity(pending), mode=UpdateMode.REPLACE, etag=pending.etag,
                                                 match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError) as exc:
                raise Conflict("pending notifications changed concurrently") from exc
        return PendingChanges(**{**pending.__dict__, "etag": str(meta["etag"])})

    def delete(self, pending: PendingChanges) -> None:
        if not valid_key(pending.account_id):
            return
        with table_errors("deleting pending notifications"):
            try:
                self._table.delete_entity(pending.account_id, PENDING_ROW, etag=pending.etag,
                                          match_condition=MatchConditions.IfNotModified)
            except ResourceModifiedError as exc:
                raise Conflict("pending notifications changed concurrently") from exc
            except ResourceNotFoundError:
                pass

    @staticmethod
    def _entity(pending: PendingChanges) -> dict[str, Any]:
        if not valid_key(pending.account_id):
            raise ValueError("account id is not a valid table key")
        return {"PartitionKey": pending.account_id, "RowKey": PENDING_ROW,
                "changes": orjson.dumps([list(pair) for pair in pending.changes]).decode(),
                "versions": orjson.dumps(dict(pending.versions)).decode(),
                "folders": orjson.dumps(dict(pending.folders)).decode(),
                "all_folders": pending.all_folders, "folder_notices": pending.folder_notices,
                "first_at": _iso(pending.first_at), "last_at": _iso(pending.newest_at),
                "enqueued_at": _iso(pending.enqueued_at)}


def _part_from_json(value: Any, at: datetime | None) -> PendingPart:
    data = orjson.loads(value) if isinstance(value, (str, bytes)) else {}
    # Parts written before rich notifications hold 3 items (no folder).
    notified = tuple((str(item[0]), str(item[1]), None if item[2] is None else str(item[2]),
                      None if len(item) < 4 or item[3] is None else str(item[3]))
                     for item in data.get("n") or () if isinstance(item, list) and len(item) in (3, 4))
    return PendingPart(notified, int(data.get("f") or 0), bool(data.get("a")), at)


def _part_time(name: str) -> datetime | None:
    """When a part was written: its name starts with the writer's clock in nanoseconds (16 hex digits)."""
    try:
        return datetime.fromtimestamp(int(name[len(PART_PREFIX):len(PART_PREFIX) + 16], 16) / 1e9, UTC)
    except ValueError:
        return None

