"""The one error hierarchy of mailsync.

Every error the core raises derives from :class:`MailsyncError`. Each class
carries a stable machine ``code`` and the HTTP status a front door should
answer with; the mapping to HTTP responses and queue retries lives in one
place (``functions/_shared/http.py`` and the sync worker), never in callers.

::

    MailsyncError
    ├── ConfigurationError            settings missing or contradictory
    ├── InputError                400 malformed request, bad field, bad job
    │   ├── PayloadTooLarge       413
    │   └── UnsupportedMediaType  415
    ├── AuthenticationError       401 missing / wrong bearer token, bad clientState
    ├── SignInElsewhere           403 the sign-in was started in another browser
    ├── NotFound                  404 unknown account (also: someone else's)
    ├── Conflict                  409 address linked elsewhere, stale ETag
    ├── RateLimited               429 a per-client limit on anonymous work (retry_after_s)
    ├── DependencyUnavailable     503 tables, queues or store down (retry_after_s)
    ├── ProviderError                 the mailbox provider (Graph, IMAP) failed
    │   ├── ProviderThrottled         429 / concurrency limit (retry_after_s)
    │   ├── ProviderUnavailable       5xx, timeouts, dropped connections
    │   ├── CursorExpired             410 / UIDVALIDITY change: resync the folder
    │   ├── ProviderAuthError         401 that a token refresh did not cure
    │   ├── ReauthRequired            invalid_grant / revoked consent
    │   ├── MalformedResponse         a page that cannot be parsed
    │   └── AddressRefused        400 a user-supplied host outside the outbound address policy
    ├── StoreError                    the search store failed
    │   └── StoreUnavailable          (also a DependencyUnavailable)
    ├── LeaseLost                     another worker owns the folder now
    └── PoisonJob                     a queue message that can never succeed
"""

from __future__ import annotations


class MailsyncError(Exception):
    """Base of every error mailsync raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigurationError(MailsyncError):
    """Settings are missing or contradictory."""

    code = "configuration_error"


class InputError(MailsyncError):
    """The caller sent something we cannot accept."""

    code = "invalid_request"
    http_status = 400


class PayloadTooLarge(InputError):
    """The request body is over the configured limit."""

    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(InputError):
    """The request body is not of a content type we read."""

    code = "unsupported_media_type"
    http_status = 415


class AuthenticationError(MailsyncError):
    """Missing or wrong credentials (bearer token, clientState)."""

    code = "unauthorized"
    http_status = 401


class SignInElsewhere(MailsyncError):
    """The OAuth callback came from a browser that did not start this sign-in (login CSRF)."""

    code = "signin_other_browser"
    http_status = 403


class NotFound(MailsyncError):
    """The thing does not exist, or belongs to someone else (never say which)."""

    code = "not_found"
    http_status = 404


class Conflict(MailsyncError):
    """The request conflicts with current state (address linked elsewhere, stale ETag)."""

    code = "conflict"
    http_status = 409


class PendingChanged(Conflict):
    """The account's pending notifications changed after a NOTIFIED job read them and before it took
    them: the job must read them again (``mailsync.monitoring.handler``)."""

    code = "pending_changed"


class RateLimited(MailsyncError):
    """The caller spent its allowance of anonymous work; it may try again after ``retry_after_s``."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class DependencyUnavailable(MailsyncError):
    """A backing service (tables, queues, store) is down; the caller may retry."""

    code = "dependency_unavailable"
    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float = 5.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class ProviderError(MailsyncError):
    """The mailbox provider failed."""

    code = "provider_error"
    http_status = 502


class ProviderThrottled(ProviderError):
    """The provider asked us to slow down; wait ``retry_after_s`` seconds."""

    code = "provider_throttled"
    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class ProviderUnavailable(ProviderError):
    """A transient provider fault (5xx, timeout, dropped connection)."""

    code = "provider_unavailable"
    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class CursorExpired(ProviderError):
    """The folder cursor is no longer valid; the folder must be resynced."""

    code = "cursor_expired"


class ProviderAuthError(ProviderError):
    """The provider rejected our credentials even after a refresh."""

    code = "provider_auth_error"
    http_status = 401


class ReauthRequired(ProviderError):
    """The user must sign in again (refresh token revoked or expired)."""

    code = "reauth_required"
    http_status = 401


class MalformedResponse(ProviderError):
    """The provider sent a page we cannot parse; nothing from it is applied."""

    code = "malformed_response"


class AddressRefused(ProviderError):
    """A user-supplied host resolves to an address the outbound policy refuses (mailsync.security.outbound).

    Permanent for the sync engine (waiting does not change it); a 400 when
    the host was just typed in (linking).
    """

    code = "address_not_allowed"
    http_status = 400


class StoreError(MailsyncError):
    """The search store failed."""

    code = "store_error"


class StoreUnavailable(StoreError, DependencyUnavailable):
    """The search store cannot be reached or is overloaded."""

    code = "store_unavailable"
    http_status = 503


class LeaseLost(MailsyncError):
    """Another worker took over the folder lease; stop without saving."""

    code = "lease_lost"
    http_status = 409


class PoisonJob(MailsyncError):
    """A queue message that can never succeed (unparseable, unknown kind)."""

    code = "poison_job"
    http_status = 400
