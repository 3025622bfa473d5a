"""Who may read or change an account: the page's bearer secret, checked in one place.

The page gets one access token per account when it creates it. The token
is ``<account_id>.<random secret>``: opaque to the page, and naming its
account lets us tell "not a valid token" (401) from "a valid token for a
*different* account" (404, exactly as for an id that does not exist, so ids
do not leak) without a second index. Only the token's SHA-256 is stored.
"""

from __future__ import annotations

from mailsync.errors import AuthenticationError, NotFound
from mailsync.models import Account
from mailsync.ports import AccountRepository
from mailsync.security.secrets import hash_secret, new_secret, secret_matches

MAX_TOKEN_LENGTH = 256


def issue_access_token(account_id: str) -> tuple[str, str]:
    """A new bearer token for ``account_id`` and the hash to store."""
    token = f"{account_id}.{new_secret()}"
    return token, hash_secret(token)


def token_account_id(token: str) -> str | None:
    """The account id a well-formed token names (None if it is not one of ours)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    account_id, sep, secret = token.partition(".")
    if not sep or not secret or not account_id.isalnum():
        return None
    return account_id


class AccountAccess:
    """Authenticates a request for an account: used by every account-scoped endpoint."""

    def __init__(self, accounts: AccountRepository) -> None:
        self._accounts = accounts

    def authenticate(self, account_id: str, bearer: str | None) -> Account:
        """The account ``account_id`` if ``bearer`` is its token.

        AuthenticationError (401): no token, or a token that is not valid for
        any account. NotFound (404): a valid token of another account, or an
        account that does not exist.
        """
        if not bearer:
            raise AuthenticationError("missing bearer token")
        owner_id = token_account_id(bearer)
        if owner_id is None:
            raise AuthenticationError("invalid bearer token")
        owner = self._accounts.get(owner_id)
        if owner is None or not secret_matches(bearer, owner.access_token_hash):
            raise AuthenticationError("invalid bearer token")
        if owner_id != account_id:
            raise NotFound("no such account")
        return owner
