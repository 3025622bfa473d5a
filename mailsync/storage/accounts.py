"""Local accounts in Azure Tables, with ETag concurrency and an identity index.

Table ``<prefix>accounts``; every partition is small::

    PartitionKey = <account_id>            RowKey = "account"      the Account record
    PartitionKey = <account_id>            RowKey = "cred-<kind>"  sealed tokens (storage/tokens.py)
    PartitionKey = "address-<sha256>"      RowKey = "claim"        which account holds a verified address
    PartitionKey = "mailbox-<sha256>"      RowKey = "claim"        which account holds an IMAP login

The identity index is what makes "this mailbox is already linked to another
account" (409) hold under races: claiming is an insert, and Tables lets
only one insert of a key succeed. What is claimed depends on the provider
(:class:`IdentityClaim`):

- an **address**, only when the provider vouches for it (Outlook: the
  address Microsoft's ``/me`` answers after sign-in);
- otherwise the **mailbox login** (IMAP: host, port and user name). An IMAP
  login proves access to a server the caller chose, not ownership of an
  address, so it never reserves one: linking ``victim@outlook.com`` as an
  IMAP user name elsewhere cannot block the real owner's Outlook link.

Address claims written by IMAP accounts before this rule (rows from older
versions) are not honoured (:meth:`_claim_is_live`), and
:meth:`TableAccountRepository.migrate_imap_claims` moves such accounts to
mailbox claims.

A claim is written before the account row names the identity, so a crash
in between leaves a claim whose account does not hold it; such a claim is
*stale* and is taken over (with an ETag check) once it is older than a
short grace period, so a failed link never locks an identity forever.

Account and token rows share a partition so the OAuth callback commits the
linked account and its first token cache in one transaction: either both
are there or neither is.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode

from mailsync.errors import Conflict, NotFound
from mailsync.models import Account, AccountStatus, Provider
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import table_errors
from mailsync.storage.tokens import MSAL, TableTokenStore

log = logging.getLogger("mailsync.storage.accounts")

ACCOUNT_ROW = "account"
CLAIM_ROW = "claim"
# How long a claim whose account does not (yet) hold the address is honoured:
# longer than any callback takes between claiming and committing.
CLAIM_GRACE = timedelta(minutes=10)
_MAX_CLAIM_ATTEMPTS = 4


def normalize_address(address: str) -> str:
    """The form addresses are compared in (case-insensitive, trimmed)."""
    return address.strip().lower()


@dataclass(frozen=True)
class IdentityClaim:
    """What a linked account holds exclusively: a verified address, or a mailbox login."""

    kind: str    # "address" | "mailbox"
    value: str   # the normalised address, or the provider user id ("imap:<host>:<port>:<user>")

    @classmethod
    def address(cls, address: str) -> IdentityClaim:
        return cls("address", normalize_address(address))

    @classmethod
    def mailbox(cls, provider_user_id: str) -> IdentityClaim:
        return cls("mailbox", provider_user_id)

    @classmethod
    def for_identity(cls, provider: Provider, address: str, provider_user_id: str) -> IdentityClaim:
        """The claim linking this identity takes: the address only where the provider verified it."""
        return cls.address(address) if provider.verifies_address else cls.mailbox(provider_user_id)

    @property
    def key(self) -> str:
        # Hashed: addresses and user names may hold characters partition keys forbid (/ \ # ?).
        return f"{self.kind}-" + hashlib.sha256(self.value.encode("utf-8")).hexdigest()

    def held_by(self, account: Account) -> bool | None:
        """Whether ``account`` holds this identity (None: it holds none yet, still linking)."""
        if self.kind == "address":
            if not account.provider.verifies_address:
                return False   # an old IMAP row: never a claim on an address
            if account.address is None:
                return None
            return normalize_address(account.address) == self.value
        if account.provider_user_id is None:
            return None
        return account.provider_user_id == self.value


def claims_of(account: Account) -> list[IdentityClaim]:
    """Every claim ``account`` may hold (its own, and an address claim an older version wrote)."""
    claims: list[IdentityClaim] = []
    if account.address:
        claims.append(IdentityClaim.address(account.address))
    if account.provider_user_id and not account.provider.verifies_address:
        claims.append(IdentityClaim.mailbox(account.provider_user_id))
    return claims


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

    def __init__(self, table: RestTable, tokens: TableTokenStore) -> None:
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

    def delete(self, account_id: str, *, etag: str | None = None) -> None:
        """Delete the account's partition (account row, credentials) and release its claims.

        With ``etag``, only if the account row is unchanged since it was read:
        Conflict (nothing deleted) when it changed, NotFound when it is gone.
        The account row goes first then, so nothing else is touched unless it did.
        """
        account = self.get(account_id)
        if etag is not None:
            with table_errors("deleting the account"):
                try:
                    self._table.delete_entity(account_id, ACCOUNT_ROW, etag=etag,
                                              match_condition=MatchConditions.IfNotModified)
                except (ResourceModifiedError, ResourceNotFoundError, HttpResponseError) as exc:
                    # The SDK reports a failed If-Match on delete as a plain 412 (and may swallow a 404).
                    if exc.status_code == 412:
                        raise Conflict("the account was changed concurrently") from exc
                    if exc.status_code == 404:
                        raise NotFound("the account no longer exists") from exc
                    raise
        with table_errors("deleting the account"):
            rows = list(self._table.query_entities("PartitionKey eq @pk", parameters={"pk": account_id},
                                                   select=["PartitionKey", "RowKey"]))
            for start in range(0, len(rows), 100):  # a transaction holds at most 100 operations
                chunk = rows[start:start + 100]
                self._table.submit_transaction([("delete", row) for row in chunk])
        for claim in claims_of(account) if account is not None else []:
            self.release(claim, account_id)

    def iter_accounts(self, statuses: tuple[AccountStatus, ...] = (),
                      providers: tuple[Provider, ...] = ()) -> Iterator[Account]:
        """Every account (optionally only in ``statuses`` / of ``providers``): a full scan, for timers."""
        query = "RowKey eq @row"
        params: dict[str, Any] = {"row": ACCOUNT_ROW}
        for field_name, values in (("status", [s.value for s in statuses]), ("provider", [p.value for p in providers])):
            if values:
                # Spaces around the parentheses: the SDK substitutes @names by splitting on spaces.
                names = [f"{field_name[0]}{i}" for i in range(len(values))]
                query += " and ( " + " or ".join(f"{field_name} eq @{n}" for n in names) + " )"
                params.update(dict(zip(names, values, strict=True)))
        with table_errors("listing accounts"):
            try:
                for entity in self._table.query_entities(query, parameters=params):
                    yield account_from_entity(entity, str(entity.metadata["etag"]))
            except ResourceNotFoundError:
                # The table comes with the first linked account: none yet (a listener or timer started first).
                return

    # -- the identity index ----------------------------------------------------

    def owner(self, claim: IdentityClaim) -> str | None:
        """The account id that holds ``claim``, or None."""
        with table_errors("reading the identity index"):
            try:
                entity = self._table.get_entity(claim.key, CLAIM_ROW)
            except ResourceNotFoundError:
                return None
        return str(entity["account_id"])

    def claim(self, claim: IdentityClaim, account_id: str, *, now: datetime | None = None) -> None:
        """Reserve ``claim`` for ``account_id``; Conflict if another account holds it."""
        now = now or datetime.now(UTC)
        row = {"PartitionKey": claim.key, "RowKey": CLAIM_ROW, "account_id": account_id,
               "kind": claim.kind, "claimed_at": _iso(now)}
        if claim.kind == "address":
            row["address"] = claim.value
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            with table_errors("claiming the mailbox identity"):
                try:
                    self._table.create_entity(row)
                    return
                except ResourceExistsError:
                    pass
                try:
                    current = self._table.get_entity(claim.key, CLAIM_ROW)
                except ResourceNotFoundError:
                    continue  # released meanwhile: insert again
            holder = str(current["account_id"])
            if holder == account_id:
                return
            if self._claim_is_live(claim, holder, _time(current["claimed_at"]), now):
                raise Conflict("this mailbox is already linked to another account")
            with table_errors("taking over a stale claim"):
                try:
                    self._table.update_entity(row, mode=UpdateMode.REPLACE, etag=current.metadata["etag"],
                                              match_condition=MatchConditions.IfNotModified)
                    return
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue  # someone else moved first: look again
        raise Conflict("this mailbox is being linked concurrently; try again")

    def release(self, claim: IdentityClaim, account_id: str) -> None:
        """Drop ``claim`` if ``account_id`` holds it (idempotent)."""
        with table_errors("releasing the mailbox identity"):
            try:
                current = self._table.get_entity(claim.key, CLAIM_ROW)
            except ResourceNotFoundError:
                return
            if str(current["account_id"]) != account_id:
                return
            try:
                self._table.delete_entity(claim.key, CLAIM_ROW, etag=current.metadata["etag"],
                                          match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, HttpResponseError) as exc:
                if getattr(exc, "status_code", None) != 412:
                    raise
                # Re-claimed meanwhile: it is not ours to drop any more.

    # The address forms: what Outlook links claim (and what tests and tools look up).
    def address_owner(self, address: str) -> str | None:
        """The account id that holds the verified ``address``, or None."""
        return self.owner(IdentityClaim.address(address))

    def claim_address(self, address: str, account_id: str, *, now: datetime | None = None) -> None:
        """Reserve the verified ``address`` for ``account_id``; Conflict if another account holds it."""
        self.claim(IdentityClaim.address(address), account_id, now=now)

    def release_address(self, address: str, account_id: str) -> None:
        """Drop the claim on ``address`` if ``account_id`` holds it (idempotent)."""
        self.release(IdentityClaim.address(address), account_id)

    def migrate_imap_claims(self, *, now: datetime | None = None) -> int:
        """Move IMAP accounts linked by older versions from address claims to mailbox claims; how many moved.

        Older versions let an IMAP link claim its user name as an address.
        Such claims are already ignored (an Outlook link takes them over);
        this gives each of those accounts its mailbox claim, so the same
        IMAP login cannot be linked twice, and drops the address claim.
        Idempotent: an account already moved costs two reads. Run by the
        hourly maintenance timer.
        """
        moved = 0
        for account in self.iter_accounts(providers=(Provider.IMAP,)):
            if not account.provider_user_id:
                continue  # never linked: holds nothing
            changed = False
            login = IdentityClaim.mailbox(account.provider_user_id)
            if self.owner(login) != account.account_id:
                try:
                    self.claim(login, account.account_id, now=now)
                    changed = True
                except Conflict:
                    # The same login was linked twice before the rule: both keep
                    # working; the first to migrate holds the claim.
                    log.warning("an IMAP login is linked to more than one account",
                                extra={"account_id": account.account_id})
            if account.address:
                address_claim = IdentityClaim.address(account.address)
                if self.owner(address_claim) == account.account_id:
                    self.release(address_claim, account.account_id)
                    changed = True
            moved += changed
        return moved

    def _claim_is_live(self, claim: IdentityClaim, holder: str, claimed_at: datetime, now: datetime) -> bool:
        owner = self.get(holder)
        if owner is None:
            return False
        held = claim.held_by(owner)
        if held is not None:
            return held
        return now - claimed_at < CLAIM_GRACE  # still linking: its callback may be running now


def _with_etag(account: Account, etag: str) -> Account:
    return replace(account, etag=etag)
