"""The identity platform's records: who calls Graph, and the grants a sign-in leaves behind.

A sign-in is a ``Session``; an authorization code (``AuthCode``) and every
refresh token (``RefreshToken``) point at the session they came from, so a
revocation after that sign-in refuses them all (graph_sandbox.identity).
These records are saved with the sandbox's state (graph_sandbox.persistence
checks their fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    """Who is calling Graph: a user through an app (delegated) or the app alone."""

    user_id: str | None
    app_id: str
    scopes: frozenset[str]
    delegated: bool


@dataclass
class Session:
    """One sign-in of a user to an app."""

    sid: str
    user_id: str
    client_id: str
    created_at: float


@dataclass(frozen=True)
class Scopes:
    """What a request asked for, as permissions and as spelled."""

    names: tuple[str, ...]     # Graph permission names and OIDC scopes
    spelled: tuple[str, ...]   # as the client asked, for the response's "scope"


@dataclass
class AuthCode:
    """An authorization code: single use, short-lived, bound to its request."""

    client_id: str
    user_id: str
    sid: str
    redirect_uri: str
    scopes: Scopes
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    expires_at: float
    redeemed: bool = False


@dataclass
class RefreshToken:
    """A refresh token's record (the token itself is opaque)."""

    client_id: str
    user_id: str
    sid: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    used: bool = False


@dataclass
class IdentityCounters:
    """What the platform did, for /sandbox/identity and the tests."""

    sign_ins: int = 0
    tokens_issued: int = 0
    refreshes: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class OAuthError(Exception):
    """An Entra error answer (token endpoint JSON, or a redirect/error page at authorize)."""

    def __init__(self, error: str, code: int, message: str, status: int = 400) -> None:
        super().__init__(f"AADSTS{code}: {message}")
        self.error = error
        self.code = code
        self.message = message
        self.status = status


def missing_parameter(name: str) -> OAuthError:
    """Entra's answer to a request without a parameter it needs."""
    return OAuthError("invalid_request", 900144, f"The request body must contain the following parameter: '{name}'.")
