"""The Outlook linker: Microsoft sign-in through MSAL, then who signed in, from Graph's ``/me``.

``begin`` starts an auth-code flow (PKCE, state, nonce) and sends the
browser to Microsoft (or the sandbox's sign-in page); ``complete`` redeems
the code, reads ``/me`` with the fresh access token, and hands the
serialised MSAL token cache back as the credential to seal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailsync.auth.msal_app import MsalApp
from mailsync.errors import InputError, MalformedResponse
from mailsync.jobs import JobKind
from mailsync.linking.service import LinkedIdentity, LinkRedirect
from mailsync.models import Provider
from mailsync.providers.graph_client import GRAPH_URL, GraphClient
from mailsync.providers.graph_transport import RequestsTransport
from mailsync.storage.tokens import MSAL

ME_FIELDS = "id,displayName,mail,userPrincipalName"


class OutlookLinker:
    """``AccountLinker`` for Outlook / Microsoft 365 mailboxes."""

    provider = Provider.OUTLOOK
    credential_kind = MSAL
    verifies_on_begin = False

    def __init__(self, msal_app: MsalApp, redirect_uri: str, *, graph_url: str = GRAPH_URL) -> None:
        self._msal = msal_app
        self._redirect_uri = redirect_uri
        self._graph_url = graph_url

    def begin(self, account_id: str, request: Mapping[str, Any], *,
              login_hint: str | None) -> LinkRedirect:
        if request:
            raise InputError(f"unexpected fields for outlook: {', '.join(sorted(request))}")
        start = self._msal.start(self._redirect_uri, login_hint=login_hint)
        return LinkRedirect(authorize_url=start.authorize_url, state=start.state, flow=start.flow)

    def complete(self, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        sign_in = self._msal.finish(flow, params)
        graph = GraphClient(lambda _force: sign_in.access_token, base_url=self._graph_url,
                            session=RequestsTransport.around(self._msal.session))
        me = graph.get("me", params={"$select": ME_FIELDS})
        if not isinstance(me, dict) or not isinstance(me.get("id"), str):
            raise MalformedResponse("Graph's /me answer has no user id")
        address = me.get("mail") or me.get("userPrincipalName")
        if not isinstance(address, str) or "@" not in address:
            raise MalformedResponse("Graph's /me answer has no mail address")
        display_name = me.get("displayName")
        return LinkedIdentity(
            address=address,
            display_name=display_name if isinstance(display_name, str) else "",
            provider_user_id=str(me["id"]),
            credential=sign_in.cache_state,
            credential_kind=MSAL,
            # Change notifications for the mailbox (mailsync.monitoring creates them), then the sync.
            first_job=JobKind.SUBSCRIPTION,
        )
