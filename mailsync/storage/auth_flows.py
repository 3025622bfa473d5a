"""Pending sign-ins, keyed by OAuth ``state``: short-lived and single use.

Table ``<prefix>authflows``, one partition per state::

    PartitionKey = sha256(state)   RowKey = "flow"
    account_id, provider, return_url, created_at, expires_at, used,
    browser_hash: sha256 of the sign-in cookie's nonce (linking/browser_binding.py),
    key_id + blob: the sealed MSAL flow (PKCE code_verifier, nonce, state)

The state itself is never a key (only its hash), and the flow, which holds
the PKCE verifier, is sealed like tokens are.

Bound to a browser: ``take`` refuses (SignInElsewhere) a callback whose
sign-in cookie does not hash to ``browser_hash``, *before* marking the row
used, so a forwarded link opened elsewhere neither links anything nor
spends the sign-in of the browser that started it. A row without
``browser_hash`` (written before the binding existed) is refused the same way.

Single use: ``take`` deletes the row with an ETag-conditional delete
before returning it, so of two callbacks racing with the same state exactly
one gets the flow; the other's delete is refused (412, or 404 once the row
is gone) and it sees "already used". (It used to mark the row ``used`` with
a conditional merge and then delete it: three table calls where two do, on
the callback a person waits for. A row an older version marked ``used`` but
failed to delete is still refused.) Expired rows are returned once too (marked expired), so the service can
tell the account what happened; rows whose sign-in was simply abandoned
are removed by ``purge_expired``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)

from mailsync.errors import Conflict, InputError, SignInElsewhere
from mailsync.security.crypto import Sealed, TokenCipher
from mailsync.security.secrets import secret_matches
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import table_errors

FLOW_ROW = "flow"
DEFAULT_TTL = timedelta(minutes=10)


def _iso(value: datetime) -> str:
    # Fixed width, so Tables' string comparison in purge_expired orders by time.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _state_key(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PendingFlow:
    """A sign-in started for an account and not finished yet."""

    account_id: str
    provider: str
    flow: dict[str, Any] = field(repr=False)
    return_url: str
    created_at: datetime
    expires_at: datetime
    browser_hash: str = field(repr=False)  # sha256 of the nonce in the starting browser's cookie

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


class TableAuthFlowStore:
    """Stores pending flows sealed, hands each out once."""

    def __init__(self, table: RestTable, cipher: TokenCipher) -> None:
        self._table = table
        self._cipher = cipher

    def put(self, state: str, pending: PendingFlow) -> None:
        """Save a new pending flow (a state is never reused: Conflict if it exists)."""
        key = _state_key(state)
        sealed = self._cipher.seal(orjson.dumps(pending.flow), context=f"authflow:{key}")
        entity = {
            "PartitionKey": key, "RowKey": FLOW_ROW,
            "account_id": pending.account_id, "provider": pending.provider, "return_url": pending.return_url,
            "created_at": _iso(pending.created_at), "expires_at": _iso(pending.expires_at),
            "used": False, "key_id": sealed.key_id, "blob": sealed.blob, "browser_hash": pending.browser_hash,
        }
        with table_errors("saving the pending sign-in"):
            try:
                self._table.create_entity(entity)
            except ResourceExistsError as exc:
                raise Conflict("a sign-in with this state already exists") from exc

    def take(self, state: str, browser_nonce: str | None) -> PendingFlow:
        """The pending flow for ``state``, exactly once, to the browser that started it.

        InputError when the state is unknown or already used;
        SignInElsewhere when ``browser_nonce`` (the sign-in cookie) is missing
        or is not the one the flow was started with; the flow then stays
        pending. An expired flow is returned (check ``expired()``) and
        consumed all the same.
        """
        if not state or len(state) > 512:
            raise InputError("the sign-in state is missing or malformed", code="invalid_state")
        key = _state_key(state)
        with table_errors("reading the pending sign-in"):
            try:
                entity = self._table.get_entity(key, FLOW_ROW)
            except ResourceNotFoundError as exc:
                raise _unknown_state() from exc
            if entity.get("used"):
                raise _unknown_state()
            if browser_nonce is None or not secret_matches(browser_nonce, str(entity.get("browser_hash") or "")):
                raise SignInElsewhere(
                    "This sign-in was started in a different browser, or its cookie expired or was blocked. "
                    "Nothing was linked. To add your mailbox, start again from mailsync's add-account page "
                    "in this browser.")
            try:
                self._table.delete_entity(key, FLOW_ROW, etag=entity.metadata["etag"],
                                          match_condition=MatchConditions.IfNotModified, missing_ok=False)
            except (ResourceModifiedError, ResourceNotFoundError) as exc:
                raise _unknown_state() from exc  # another callback took it a moment ago
        flow = orjson.loads(self._cipher.open(Sealed(str(entity["key_id"]), bytes(entity["blob"])),
                                              context=f"authflow:{key}"))
        return PendingFlow(
            account_id=str(entity["account_id"]), provider=str(entity["provider"]), flow=flow,
            return_url=str(entity["return_url"]),
            created_at=datetime.fromisoformat(str(entity["created_at"])),
            expires_at=datetime.fromisoformat(str(entity["expires_at"])),
            browser_hash=str(entity["browser_hash"]),
        )

    def discard(self, state: str) -> None:
        """Delete a pending flow that was never handed out (its account could not be saved)."""
        with table_errors("removing the pending sign-in"):
            self._table.delete_entity(_state_key(state), FLOW_ROW)

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete flows that expired (abandoned sign-ins); returns how many."""
        cutoff = _iso(now or datetime.now(UTC))
        removed = 0
        with table_errors("purging expired sign-ins"):
            rows = self._table.query_entities("expires_at lt @cutoff", parameters={"cutoff": cutoff},
                                              select=["PartitionKey", "RowKey"])
            for row in rows:
                try:
                    self._table.delete_entity(row["PartitionKey"], row["RowKey"])
                    removed += 1
                except HttpResponseError:
                    continue  # taken or deleted concurrently
        return removed


def _unknown_state() -> InputError:
    return InputError("this sign-in is unknown, expired or was already used; start again", code="invalid_state")
