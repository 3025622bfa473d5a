"""The sync table's rows: their keys, the records read from them, and the entity mapping.

``mailsync.storage.sync_table.SyncStateTable`` holds the rules (leases, slots,
dirty flags; its module docstring lists the rows); this module holds what a
row *is*: ``SyncState`` (the folder list or one folder), ``Lease`` and
``Slot`` (proofs of holding one), ``SlotRow``, ``Released`` and
``AccountSyncState`` (an account's rows from one partition query), and how
each is written as a table entity and read back.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mailsync.errors import InputError
from mailsync.models import SyncPhase

FOLDER_LIST_ROW = "folders"
FOLDER_ROW_PREFIX = "f:"
SLOT_ROW_PREFIX = "slot:"
PENDING_ROW = "pending"    # the account's pending notifications (mailsync.storage.subscriptions)
_OPTIONAL_INTS = frozenset({"expected", "unread", "children"})
_FORBIDDEN_KEY_CHARS = frozenset("/\\#?") | {chr(c) for c in range(0x20)} | {chr(0x7F)}



def folder_row_key(folder_id: str) -> str:
    """RowKey of a folder: base64url of its id (provider ids may hold '/', '+', '=')."""
    return FOLDER_ROW_PREFIX + base64.urlsafe_b64encode(folder_id.encode()).decode().rstrip("=")


def check_partition(account_id: str) -> str:
    """``account_id`` as a PartitionKey; InputError if the table cannot key it."""
    if not account_id or len(account_id) > 200 or any(ch in _FORBIDDEN_KEY_CHARS for ch in account_id):
        raise InputError("account id is not usable as a table key")
    return account_id


def new_owner(delivery_id: str) -> str:
    """A lease owner token: the queue delivery it came from plus a nonce for this run."""
    return f"{delivery_id}#{uuid.uuid4().hex[:12]}"


def delivery_of(owner: str) -> str:
    """The queue delivery part of a lease owner token."""
    return owner.rpartition("#")[0] or owner



@dataclass(frozen=True)
class SyncState:
    """One row: the folder list (``folder_id is None``) or one folder of an account.

    ``cursor`` is the provider's opaque cursor (None: start a full round).
    ``epoch`` numbers the full rounds (initial, resyncs); writes of a round
    carry it so the round's end can delete what it did not see. ``rounds``
    counts completed rounds: 0 means the initial round never finished.
    ``generation`` is the store generation this cursor belongs to: if the
    store reports another one, the index was recreated and the folder must
    be read again from scratch.
    """

    account_id: str
    folder_id: str | None
    cursor: str | None = None
    phase: SyncPhase = SyncPhase.INITIAL
    epoch: int = 0
    generation: str = ""
    dirty: bool = False
    resync_requested: bool = False
    lease_owner: str = ""
    lease_until: float = 0.0
    indexed: int = 0
    removed: int = 0
    expected: int | None = None
    failures: int = 0
    not_before: float = 0.0
    rounds: int = 0
    round_started: float = 0.0
    name: str = ""
    role: str | None = None
    parent_id: str | None = None
    unread: int | None = None
    children: int | None = None
    first_screen: bool = False
    mid_round: bool = False      # ``cursor`` is a page link inside a round, not a round's final link
    relook_at: float = 0.0       # a look-again after a notified round is due then (one at a time)
    updated_at: float = 0.0
    etag: str | None = None

    @property
    def is_folder_list(self) -> bool:
        return self.folder_id is None

    @property
    def row_key(self) -> str:
        return FOLDER_LIST_ROW if self.folder_id is None else folder_row_key(self.folder_id)

    @property
    def initial_done(self) -> bool:
        return self.rounds > 0

    def leased(self, now: float) -> bool:
        return bool(self.lease_owner) and self.lease_until > now


@dataclass(frozen=True)
class Lease:
    """Proof of holding a row's lease: the row as last written by us, and our token.

    ``from_known``: taken on the caller's copy of the row (``acquire``'s ``known``) at the first
    try, so the row had not changed since the caller read it (the take was conditional on its ETag).
    """

    state: SyncState
    owner: str
    from_known: bool = False


@dataclass(frozen=True)
class Slot:
    """One of the mailbox's request slots, held for an invocation."""

    account_id: str
    index: int
    owner: str
    etag: str


@dataclass(frozen=True)
class SlotRow:
    """A slot row as ``load`` read it: who holds it until when, and its ETag (to take it without re-reading)."""

    index: int
    owner: str
    until: float
    etag: str


@dataclass(frozen=True)
class Released:
    """A folder's row and the slot given back together (``finish_and_release_slot``), as that left them."""

    row: SyncState
    slot: SlotRow


@dataclass(frozen=True)
class AccountSyncState:
    """Every sync row of one account, read with one partition query."""

    account_id: str
    folder_list: SyncState | None
    folders: Mapping[str, SyncState]
    slots_busy: int
    slots: tuple[SlotRow, ...] = ()
    # Rows of the partition that are not the engine's (the pending notifications), as read: RowKey -> entity.
    others: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def folder(self, folder_id: str) -> SyncState | None:
        return self.folders.get(folder_id)


# --- entity mapping ---------------------------------------------------------------

def all_fields() -> tuple[str, ...]:
    """Every field of a row the engine writes (a new row writes them all)."""
    return ("cursor", "phase", "epoch", "generation", "dirty", "resync_requested", "lease_owner", "lease_until",
            "indexed", "removed", "expected", "failures", "not_before", "rounds", "round_started", "name", "role",
            "parent_id", "unread", "children", "first_screen", "mid_round", "relook_at")


def to_entity(state: SyncState, fields: set[str]) -> dict[str, Any]:
    """The entity properties of ``fields`` of ``state`` (plus its folder id)."""
    values = {name: getattr(state, name) for name in fields}
    values["folder_id"] = state.folder_id or ""
    return to_entity_fields(values)


def to_entity_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Field values as a table takes them (a phase as its name, None as the unset marker)."""
    entity: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, SyncPhase):
            value = value.value
        elif value is None:
            # Tables drop None; "" / -1 mean "unset" so a merge can clear a field.
            value = -1 if name in _OPTIONAL_INTS else ""
        elif isinstance(value, float):
            value = float(value)
        entity[name] = value
    return entity


def from_entity(entity: Mapping[str, Any]) -> SyncState:
    """A row as read (with its ETag), tolerant of fields an older or newer version wrote."""
    def num(name: str, default: float = 0.0) -> float:
        value = entity.get(name)
        return float(value) if isinstance(value, (int, float)) else default

    def integer(name: str) -> int:
        value = entity.get(name)
        return int(value) if isinstance(value, (int, float)) else 0

    def optional_int(name: str) -> int | None:
        value = entity.get(name)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    phase_raw = entity.get("phase") or SyncPhase.INITIAL.value
    try:
        phase = SyncPhase(phase_raw)
    except ValueError:
        phase = SyncPhase.RESYNC  # unknown phase written by a future version: start over
    metadata = getattr(entity, "metadata", None) or {}
    return SyncState(
        account_id=entity["PartitionKey"],
        folder_id=(entity.get("folder_id") or None) if entity["RowKey"] != FOLDER_LIST_ROW else None,
        cursor=entity.get("cursor") or None,
        phase=phase,
        epoch=integer("epoch"),
        generation=str(entity.get("generation") or ""),
        dirty=bool(entity.get("dirty")),
        resync_requested=bool(entity.get("resync_requested")),
        lease_owner=str(entity.get("lease_owner") or ""),
        lease_until=num("lease_until"),
        indexed=integer("indexed"),
        removed=integer("removed"),
        expected=optional_int("expected"),
        failures=integer("failures"),
        not_before=num("not_before"),
        rounds=integer("rounds"),
        round_started=num("round_started"),
        name=str(entity.get("name") or ""),
        role=str(entity.get("role") or "") or None,
        parent_id=str(entity.get("parent_id") or "") or None,
        unread=optional_int("unread"),
        children=optional_int("children"),
        first_screen=bool(entity.get("first_screen")),
        mid_round=bool(entity.get("mid_round")),
        relook_at=num("relook_at"),
        updated_at=num("updated_at"),
        etag=metadata.get("etag"),
    )


def slot_row_from_entity(entity: Mapping[str, Any]) -> SlotRow | None:
    """A ``slot:<n>`` row as read (with its ETag); None for a slot key without a number."""
    suffix = str(entity["RowKey"])[len(SLOT_ROW_PREFIX):]
    if not suffix.isdigit():
        return None
    metadata = getattr(entity, "metadata", None) or {}
    return SlotRow(int(suffix), str(entity.get("owner") or ""), float(entity.get("until") or 0.0),
                   str(metadata.get("etag")))


def apply_fields(state: SyncState, fields: Mapping[str, Any], etag: str, now: float) -> SyncState:
    """``state`` as a merge of ``fields`` that answered ``etag`` at ``now`` left it."""
    values = {k: v for k, v in fields.items() if k in SyncState.__dataclass_fields__}
    if values.get("cursor") == "":
        values["cursor"] = None
    return replace(state, etag=etag, updated_at=now, **values)
