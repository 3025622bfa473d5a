"""App registrations the sandbox's identity platform knows, and the permission names it grants.

The demo app is what the product uses when no Microsoft app registration is
configured; its id and secret are the same as in
``mailsync.auth.sandbox_routing`` (a test checks). Scopes are Graph's mail
subset, matched case-insensitively and answered in Graph's casing, as Entra does.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from graph_sandbox.tokens import GRAPH_APP_ID, GRAPH_RESOURCE

# The demo app the product uses when no Microsoft app registration is
# configured. Same values as mailsync.auth.sandbox_routing (a test checks).
DEMO_CLIENT_ID = "3f8e2a6c-51d4-4b7e-9c0a-6d2b1e7f4a93"
DEMO_CLIENT_SECRET = "demo~sandbox-secret-not-for-production"

# Delegated Graph permissions the sandbox knows (the mail subset of Graph's).
GRAPH_DELEGATED_SCOPES = frozenset({
    "Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite", "Mail.Send",
    "MailboxSettings.Read", "MailboxSettings.ReadWrite", "User.Read", "User.ReadBasic.All",
})
# Application permissions (roles) an app-only token can carry.
GRAPH_APP_ROLES = frozenset({
    "Mail.Read", "Mail.ReadBasic", "Mail.ReadBasic.All", "Mail.ReadWrite", "Mail.Send",
    "User.Read.All", "MailboxSettings.Read",
})
OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})


@dataclass(frozen=True)
class AppRegistration:
    """One app registration (a confidential web app unless ``client_secret`` is None).

    ``redirect_uris`` are compared exactly, except Entra's loopback rule: a
    registered ``http://127.0.0.1/...`` or ``http://localhost/...`` URI matches
    any port at run time (the path must still match).
    """

    client_id: str
    display_name: str
    client_secret: str | None
    redirect_uris: tuple[str, ...]
    # Delegated permissions consented for the app ("/.default" asks for these).
    delegated_scopes: frozenset[str] = GRAPH_DELEGATED_SCOPES
    # Application permissions granted by an admin (client_credentials roles).
    app_roles: frozenset[str] = frozenset({"Mail.ReadWrite", "User.Read.All"})
    # Entra only insists on PKCE for SPAs and public clients; the sandbox can
    # insist for any app so a client that forgets PKCE fails here first.
    require_pkce: bool = True

    def redirect_uri_allowed(self, uri: str) -> bool:
        return any(_redirect_matches(registered, uri) for registered in self.redirect_uris)


def _redirect_matches(registered: str, uri: str) -> bool:
    if registered == uri:
        return True
    reg, got = urlsplit(registered), urlsplit(uri)
    loopback = {"127.0.0.1", "localhost", "[::1]", "::1"}
    if reg.scheme == "http" and got.scheme == "http" and (reg.hostname or "") in loopback:
        try:
            got.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            return False
        return (got.hostname == reg.hostname and got.path == reg.path and got.query == reg.query
                and not got.fragment)
    return False


DEMO_APP = AppRegistration(
    client_id=DEMO_CLIENT_ID,
    display_name="mailsync (sandbox demo)",
    client_secret=DEMO_CLIENT_SECRET,
    redirect_uris=(
        "http://127.0.0.1/api/oauth/callback",
        "http://localhost/api/oauth/callback",
    ),
)


def parse_scopes(raw: str) -> tuple[str, ...]:
    """The scopes of a ``scope`` parameter, in order, each once."""
    return tuple(dict.fromkeys(s for s in raw.split() if s))


def graph_permission(scope: str) -> str:
    """``https://graph.microsoft.com/Mail.Read`` -> ``Mail.Read``; unqualified names pass through.

    Permission names are case-insensitive in Entra; answer in Graph's casing.
    """
    name = scope
    for prefix in (GRAPH_RESOURCE + "/", GRAPH_APP_ID + "/"):
        if scope.lower().startswith(prefix.lower()):
            name = scope[len(prefix):]
            break
    else:
        if "/" in scope or ":" in scope:
            return scope  # another resource: unknown here
    if name == ".default":
        return name
    for known in GRAPH_DELEGATED_SCOPES:
        if known.lower() == name.lower():
            return known
    return name
