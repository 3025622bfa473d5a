"""Encrypted credential rows: an account's MSAL token cache (and, later, an IMAP password).

Rows live in the accounts table, in the account's own partition, so the
callback can write the account and its tokens in one transaction and unlink
can drop both together::

    PartitionKey = <account_id>   RowKey = "cred-<kind>"    (kind: msal, imap, ...)
    key_id, blob (AES-GCM nonce||ciphertext||tag), updated_at

The plaintext never touches the table: rows are sealed with
``mailsync.security.crypto`` and bound to ``<kind>:<account_id>``, so a blob
copied onto another account's row does not open.

Concurrency: every write names the ETag it read. Two workers that refreshed
the same cache at once cannot both win; the loser gets ``Conflict`` and
re-reads (see ``mailsync.auth.token_provider``). That is how a rotated
refresh token is never overwritten by an older one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from mailsync.errors import Conflict, NotFound
from mailsync.security.crypto import Sealed, TokenCipher
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import table_errors

MSAL = "msal"


def credential_row_key(kind: str) -> str:
    return f"cred-{kind}"


@dataclass(frozen=True)
class StoredCredential:
    """A decrypted credential and the ETag of the row it came from."""

    account_id: str
    kind: str
    plaintext: str = field(repr=False)
    etag: str
    key_id: str


class TableTokenStore:
    """Reads and writes sealed credential rows with ETag concurrency."""

    def __init__(self, table: RestTable, cipher: TokenCipher) -> None:
        self._table = table
        self._cipher = cipher

    def read(self, account_id: str, kind: str = MSAL) -> StoredCredential | None:
        """The account's credential of ``kind``, decrypted; None when there is none."""
        with table_errors("reading stored tokens"):
            try:
                entity = self._table.get_entity(account_id, credential_row_key(kind))
            except ResourceNotFoundError:
                return None
        sealed = Sealed(str(entity["key_id"]), bytes(entity["blob"]))
        plaintext = self._cipher.open(sealed, context=self._context(kind, account_id))
        return StoredCredential(account_id, kind, plaintext.decode("utf-8"), str(entity.metadata["etag"]),
                                sealed.key_id)

    def write(self, account_id: str, plaintext: str, *, etag: str | None, kind: str = MSAL) -> str:
        """Store a new credential; return the row's new ETag.

        ``etag=None`` creates the row (Conflict if one exists); otherwise the
        row is replaced only if it is still the version read (Conflict if
        someone wrote in between, NotFound if it was deleted: unlinked).
        """
        entity = self.entity(account_id, plaintext, kind=kind)
        with table_errors("saving tokens"):
            try:
                if etag is None:
                    meta = self._table.create_entity(entity)
                else:
                    meta = self._table.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag,
                                                     match_condition=MatchConditions.IfNotModified)
            except ResourceExistsError as exc:
                raise Conflict("tokens were stored concurrently") from exc
            except ResourceModifiedError as exc:
                raise Conflict("tokens were refreshed concurrently") from exc
            except ResourceNotFoundError as exc:
                raise NotFound("the account's tokens were deleted") from exc
        return str(meta["etag"])

    def entity(self, account_id: str, plaintext: str, *, kind: str = MSAL) -> dict[str, Any]:
        """The sealed row for ``plaintext`` (for a transaction with the account row)."""
        sealed = self._cipher.seal(plaintext.encode("utf-8"), context=self._context(kind, account_id))
        return {
            "PartitionKey": account_id,
            "RowKey": credential_row_key(kind),
            "key_id": sealed.key_id,
            "blob": sealed.blob,
            "updated_at": datetime.now(UTC).isoformat(),
        }

    def delete(self, account_id: str, kind: str = MSAL) -> None:
        """Forget the credential (idempotent)."""
        with table_errors("deleting tokens"):
            self._table.delete_entity(account_id, credential_row_key(kind))

    @staticmethod
    def _context(kind: str, account_id: str) -> str:
        return f"{kind}:{account_id}"
