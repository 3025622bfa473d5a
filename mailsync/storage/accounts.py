"""Local accounts in Azure Tables, with ETag concurrency and an address index.

Table ``<prefix>accounts``; every partition is small::

    PartitionKey = <account_id>            RowKey = "account"      the Account record
    PartitionKey = <account_id>            RowKey = "cred-<kind>"  sealed tokens (storage/tokens.py)
    PartitionKey = "address-<sha256>"      RowKey = "claim"        which account holds an address

The address index is what makes "this address is already linked to another
account" (409) hold under races: claiming is an insert, and Tables lets
only one insert of a key succeed. A claim is written before the account
row names the address, so a crash in between leaves a claim whose account
does not hold the address; such a claim is *stale* and is taken over (with
an ETag check) once it is older than a short grace period, so a failed link
never locks an address forever.

Account and token rows share a partition so the OAuth callback commits the
linked account and its first token cache in one transaction: either both
are there or neither is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, UpdateMode

from mailsync.errors import Conflict, NotFound
from mailsync.models import Account, AccountStatus, Provider
from mailsync.storage.table_errors import table_errors
from mailsync.storage.tokens import MSAL, TableTokenStore

ACCOUNT_ROW = "account"
CLAIM_ROW = "claim"
# How long a claim whose account does not (yet) hold the address is honoured:
# longer than any callback takes between claiming and committing.
CLAIM_GRACE = timedelta(minutes=10)
_MAX_CLAIM_ATTEMPTS = 4


def normalize_address(address: str) -> str:
    """The form addresses are compared in (case-insensitive, trimmed)."""
    return address.strip().lower()


def _address_key(address: str) -> str:
    # Hashed: addresses may hold characters partition keys forbid (/ \ # ?).
    return "address-" + hashlib.sha256(normalize_address(address).encode("utf-8")).hexdigest()


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _opt(entity: Mapping[str, Any], key: str) -> str | None:
    value = entity.get(key)
    return None if value is None or value == "" else str(value)


def account_to_entity(account: Account) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": account.account_id,
        "RowKey": ACCOUNT_ROW,
        "provider": account.provider.value,
        "status": account.status.value,
        "access_token_hash": account.access_token_hash,
        "created_at": _iso(account.created_at),
        "updated_at": _iso(account.updated_at),
    }
    for key in ("address", "display_name", "return_url", "error", "provider_user_id"):
        value = getattr(account, key)
        if value is not None:
            entity[key] = value
    return entity


def account_from_entity(entity: Mapping[str, Any], etag: str | None) -> Account:
    return Account(
        account_id=str(entity["PartitionKey"]),
        provider=Provider(str(entity["provider"])),
        status=AccountStatus(str(entity["status"])),
        access_token_hash=str(entity["access_token_hash"]),
        created_at=_time(entity["created_at"]),
        updated_at=_time(entity["updated_at"]),
        address=_opt(entity, "address"),
        display_name=_opt(entity, "display_name"),
        return_url=_opt(entity, "return_url"),
        error=_opt(entity, "error"),
        provider_user_id=_opt(entity, "provider_user_id"),
        etag=etag,
    )


class TableAccountRepository:
    """``AccountRepository`` on Azure Tables (plus the address index and linked-commit)."""

    def __init__(self, table: TableClient, tokens: TableTokenStore) -> None:
        self._table = table
        self._tokens = tokens

    def get(self, account_id: str) -> Account | None:
        if not account_id or not account_id.isalnum():
            return None  # not an id we make: never a key in the table
        with table_errors("reading the account"):
            try:
                entity = self._table.get_entity(account_id, ACCOUNT_ROW)
            except ResourceNotFoundError:
                return None
        return account_from_entity(entity, str(entity.metadata["etag"]))

    def save(self, account: Account) -> Account:
        """Insert (``etag`` None) or replace if unchanged since read; returns the record with its new etag.

        Conflict when the row exists (insert) or changed meanwhile (replace);
        NotFound when it was deleted meanwhile.
        """
        entity = account_to_entity(account)
        with table_errors("saving the account"):
            try:
                if account.etag is None:
                    meta = self._table.create_entity(entity)
                else:
                    meta = self._table.update_entity(entity, mode=UpdateMode.REPLACE, etag=account.etag,
                                                     match_condition=MatchConditions.IfNotModified)
            except ResourceExistsError as exc:
                raise Conflict("the account already exists") from exc
            except ResourceModifiedError as exc:
                raise Conflict("the account was changed concurrently") from exc
            except ResourceNotFoundError as exc:
                raise NotFound("the account no longer exists") from exc
        return _with_etag(account, str(meta["etag"]))

    def save_with_credential(self, account: Account, credential: str, *, kind: str = MSAL) -> Account:
        """Insert (``etag`` None) or replace the account (ETag-checked) and store its credential, atomically.

        One entity-group transaction: the account row and the sealed
        credential row are written together or not at all.
        """
        account_op: Any = ("create", account_to_entity(account))
        if account.etag is not None:
            account_op = ("update", account_to_entity(account),
                          {"mode": UpdateMode.REPLACE, "etag": account.etag,
                           "match_condition": MatchConditions.IfNotModified})
        operations: list[Any] = [
            account_op,
            ("upsert", self._tokens.entity(account.account_id, credential, kind=kind), {"mode": UpdateMode.REPLACE}),
        ]
        with table_errors("saving the linked account"):
            try:
                results = self._table.submit_transaction(operations)
            except HttpResponseError as exc:
                if exc.status_code == 404:
                    raise NotFound("the account no longer exists") from exc
                if exc.status_code == 412:
                    raise Conflict("the account was changed concurrently") from exc
                if exc.status_code == 409:
                    raise Conflict("the account already exists") from exc
                raise
        return _with_etag(account, str(results[0]["etag"]))

    def delete(self, account_id: str) -> None:
        """Delete the account's partition (account row, credentials) and release its address."""
        account = self.get(account_id)
        with table_errors("deleting the account"):
            rows = list(self._table.query_entities("PartitionKey eq @pk", parameters={"pk": account_id},
                                                   select=["PartitionKey", "RowKey"]))
            for start in range(0, len(rows), 100):  # a transaction holds at most 100 operations
                chunk = rows[start:start + 100]
                self._table.submit_transaction([("delete", row) for row in chunk])
        if account is not None and account.address:
            self.release_address(account.address, account_id)

    def iter_accounts(self, statuses: tuple[AccountStatus, ...] = ()) -> Iterator[Account]:
        """Every account (optionally only in ``statuses``): a full scan, for timers, not requests."""
        query = "RowKey eq @row"
        params: dict[str, Any] = {"row": ACCOUNT_ROW}
        if statuses:
            # Spaces around the parentheses: the SDK substitutes @names by splitting on spaces.
            query += " and ( " + " or ".join(f"status eq @s{i}" for i in range(len(statuses))) + " )"
            params.update({f"s{i}": status.value for i, status in enumerate(statuses)})
        with table_errors("listing accounts"):
            try:
                for entity in self._table.query_entities(query, parameters=params):
                    yield account_from_entity(entity, str(entity.metadata["etag"]))
            except ResourceNotFoundError:
                # The table comes with the first linked account: none yet (a listener or timer started first).
                return

    # -- the address index -------------------------------------------------

    def address_owner(self, address: str) -> str | None:
        """The account id that holds ``address`` (claimed), or None."""
        with table_errors("reading the address index"):
            try:
                entity = self._table.get_entity(_address_key(address), CLAIM_ROW)
            except ResourceNotFoundError:
                return None
        return str(entity["account_id"])

    def claim_address(self, address: str, account_id: str, *, now: datetime | None = None) -> None:
        """Reserve ``address`` for ``account_id``; Conflict if another account holds it."""
        key = _address_key(address)
        now = now or datetime.now(UTC)
        row = {"PartitionKey": key, "RowKey": CLAIM_ROW, "account_id": account_id,
               "address": normalize_address(address), "claimed_at": _iso(now)}
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            with table_errors("claiming the address"):
                try:
                    self._table.create_entity(row)
                    return
                except ResourceExistsError:
                    pass
                try:
                    current = self._table.get_entity(key, CLAIM_ROW)
                except ResourceNotFoundError:
                    continue  # released meanwhile: insert again
            holder = str(current["account_id"])
            if holder == account_id:
                return
            if self._claim_is_live(holder, address, _time(current["claimed_at"]), now):
                raise Conflict("this address is already linked to another account")
            with table_errors("taking over a stale address claim"):
                try:
                    self._table.update_entity(row, mode=UpdateMode.REPLACE, etag=current.metadata["etag"],
                                              match_condition=MatchConditions.IfNotModified)
                    return
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue  # someone else moved first: look again
        raise Conflict("this address is being linked concurrently; try again")

    def release_address(self, address: str, account_id: str) -> None:
        """Drop the claim on ``address`` if ``account_id`` holds it (idempotent)."""
        key = _address_key(address)
        with table_errors("releasing the address"):
            try:
                current = self._table.get_entity(key, CLAIM_ROW)
            except ResourceNotFoundError:
                return
            if str(current["account_id"]) != account_id:
                return
            try:
                self._table.delete_entity(key, CLAIM_ROW, etag=current.metadata["etag"],
                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, HttpResponseError) as exc:
                if getattr(exc, "status_code", None) != 412:
                    raise
                # Re-claimed meanwhile: it is not ours to drop any more.

    def _claim_is_live(self, holder: str, address: str, claimed_at: datetime, now: datetime) -> bool:
        owner = self.get(holder)
        if owner is None:
            return False
        if owner.address is not None:
            return normalize_address(owner.address) == normalize_address(address)
        return now - claimed_at < CLAIM_GRACE  # still linking: its callback may be running now


def _with_etag(account: Account, etag: str) -> Account:
    return replace(account, etag=etag)
