"""The page's live channel: ``POST /api/negotiate`` with the account's bearer token.

The token names its account (``<account_id>.<secret>``), so the page sends
nothing else: the account is found from the token, the token is verified
against that account, and only then is connection info minted — with the
verified account id as the SignalR user id. The sync worker addresses
``syncProgress`` / ``messagesChanged`` to that same user id, so a
connection only ever receives its own account's events.
"""

from __future__ import annotations

from mailsync.errors import AuthenticationError
from mailsync.linking.access import AccountAccess, token_account_id
from mailsync.models import LiveConnectionInfo
from mailsync.ports import LiveConnections


class LiveChannel:
    """Negotiate: bearer token → connection info for the token's own account."""

    def __init__(self, access: AccountAccess, connections: LiveConnections) -> None:
        self._access = access
        self._connections = connections

    def negotiate(self, bearer: str | None) -> LiveConnectionInfo:
        """Connection info whose user id is the account ``bearer`` opens; AuthenticationError (401) otherwise."""
        account_id = token_account_id(bearer or "")
        if account_id is None:
            raise AuthenticationError("missing or malformed bearer token")
        account = self._access.authenticate(account_id, bearer)
        return self._connections.connection_info(account.account_id)
