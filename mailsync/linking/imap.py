"""The IMAP linker: verify the login, then link at once (no redirect, no callback).

``POST /api/accounts`` with::

    {"provider": "imap", "host": "imap.example.com", "port": 993, "security": "tls",
     "username": "me@example.com", "password": "...", "display_name": "optional"}

``security`` is ``tls`` (implicit TLS, port 993 by default) or ``starttls``
(port 143 by default); ``none`` (plaintext) only where ``IMAP_ALLOW_INSECURE``
is set — tests and local development against a loopback Dovecot, never by
default. The login is tried before anything is written, so a wrong
password or an unreachable server answers 400 with a readable reason and
leaves no account behind (the linking service writes only after ``begin``).
The reason is one of a few fixed sentences (refused, timed out, TLS failed,
not an IMAP server, login failed, outside the address policy): never what
the server said. The check runs on a bounded pool of its own
(``IMAP_VERIFY_CONCURRENCY``) with a short timeout for the connect and the
greeting (``IMAP_VERIFY_TIMEOUT_S``; later reads are bounded by
``IMAP_TIMEOUT_S``, since a server may hold a login back for seconds after a
wrong password); when
the pool is full the answer is 503 with ``Retry-After``.

The password is sealed exactly like an Outlook token cache: the
credential row ``cred-imap`` of the account (AES-GCM, bound to the
account id), written in the same table transaction as the account.
Workers read it back through :class:`SealedCredentials`, the
``TokenProvider`` the IMAP provider factory is given.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from mailsync.errors import (
    AddressRefused,
    InputError,
    NotFound,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
)
from mailsync.linking.login_checks import LoginCheckPool
from mailsync.linking.service import LinkedIdentity
from mailsync.models import Provider
from mailsync.providers.imap import ImapCredentials
from mailsync.providers.imap_session import ImapEndpoint, ImapSession
from mailsync.security.outbound import POLICY_MESSAGE, OutboundPolicy
from mailsync.settings import Settings
from mailsync.storage.tokens import TableTokenStore

log = logging.getLogger("mailsync.linking.imap")

IMAP = "imap"   # credential kind (row "cred-imap")
FIELDS = frozenset({"host", "port", "security", "username", "password", "display_name"})
DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}"
                   r"[A-Za-z0-9])?)*\.?$|^\[?[0-9a-fA-F:.]+\]?$")


def _text(request: Mapping[str, Any], name: str, *, limit: int, required: bool = True) -> str:
    value = request.get(name)
    if value is None or value == "":
        if required:
            raise InputError(f"{name} is required for an IMAP account", code="invalid_imap_settings")
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string", code="invalid_imap_settings")
    if len(value) > limit or any(ord(c) < 0x20 for c in value):
        raise InputError(f"{name} is too long or holds control characters", code="invalid_imap_settings")
    return value


def parse_request(request: Mapping[str, Any], *, allow_insecure: bool) -> tuple[ImapCredentials, str]:
    """The POST body's IMAP fields → credentials and display name; InputError says what is wrong."""
    unknown = set(request) - FIELDS
    if unknown:
        raise InputError(f"unexpected fields for imap: {', '.join(sorted(unknown))}", code="invalid_imap_settings")
    host = _text(request, "host", limit=253).strip()
    if not _HOST.match(host):
        raise InputError(f"host {host!r} is not a host name or IP address", code="invalid_imap_settings")
    security = _text(request, "security", limit=16, required=False) or "tls"
    if security not in ("tls", "starttls", "none"):
        raise InputError('security must be "tls" or "starttls"', code="invalid_imap_settings")
    if security == "none" and not allow_insecure:
        raise InputError('security "none" (no encryption) is not allowed here; use "tls" or "starttls"',
                         code="insecure_imap_refused")
    port = request.get("port", DEFAULT_PORTS[security])
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InputError("port must be a number from 1 to 65535", code="invalid_imap_settings")
    username = _text(request, "username", limit=320)
    password = _text(request, "password", limit=1024)
    display_name = _text(request, "display_name", limit=256, required=False)
    endpoint = ImapEndpoint(host=host.rstrip(".").strip("[]"), port=port, security=security, username=username)
    return ImapCredentials(endpoint=endpoint, password=password), display_name


# What the page is told when a login check fails: fixed sentences, never what the server said (a
# banner or an error line would make the linker a banner grabber; see docs/security.md).
_FAILURES: dict[str, tuple[str, str]] = {
    "address_not_allowed": ("address_not_allowed", POLICY_MESSAGE),
    "host_not_found": ("imap_unreachable", "The host name {host} could not be found."),
    "imap_unreachable": ("imap_unreachable", "Could not connect to the IMAP server {where}: the connection was "
                                             "refused or dropped."),
    "imap_timeout": ("imap_unreachable", "The IMAP server {where} did not answer in time."),
    "imap_tls_failed": ("imap_tls_failed", "TLS with the IMAP server {where} failed (certificate or protocol)."),
    "imap_not_imap": ("imap_unsupported", "{where} is not an IMAP server (or does not offer STARTTLS)."),
    "login_failed": ("imap_login_failed", "The IMAP server {where} refused the user name or password."),
    "no_inbox": ("imap_unsupported", "{where} shows no INBOX for this user."),
    "failed_after_login": ("imap_unreachable", "The IMAP server {where} failed after the login."),
}


def _kind_of(exc: ProviderError) -> str:
    """The ``_FAILURES`` key for a session failure before the login was accepted."""
    if exc.code in _FAILURES:
        return exc.code
    if isinstance(exc, ProviderUnavailable):   # during LOGIN: a read that timed out, or the connection cut
        return "imap_timeout" if isinstance(exc.__cause__, TimeoutError) else "imap_unreachable"
    return "imap_not_imap"                     # an answer that is not IMAP (unparseable, BAD)


def _failure(kind: str, endpoint: ImapEndpoint) -> InputError:
    code, text = _FAILURES[kind]
    return InputError(text.format(host=endpoint.host, where=endpoint.describe()), code=code)


class ImapLinker:
    """``AccountLinker`` for IMAP mailboxes (password login, verified before linking).

    The login check goes through the outbound address policy (the host must
    resolve to public addresses, mailsync.security.outbound) and runs on the
    bounded ``checks`` pool, never on the thread serving the request
    (mailsync.linking.login_checks).
    """

    provider = Provider.IMAP
    credential_kind = IMAP
    verifies_on_begin = True   # logs in to the caller's server: limited per client

    def __init__(self, settings: Settings, *, connect: Any = ImapSession.connect,
                 checks: LoginCheckPool | None = None) -> None:
        self._settings = settings
        self._connect = connect
        self._policy = OutboundPolicy.from_entries(settings.imap_allowed_hosts)
        # Connect and greeting (short), then STARTTLS, login and LIST (reads bounded by IMAP_TIMEOUT_S).
        self._checks = checks or LoginCheckPool(settings.imap_verify_concurrency,
                                                deadline_s=settings.imap_verify_timeout_s + 3 * settings.imap_timeout_s)

    def begin(self, account_id: str, request: Mapping[str, Any], *, login_hint: str | None) -> LinkedIdentity:
        credentials, display_name = parse_request(request, allow_insecure=self._settings.imap_allow_insecure)
        endpoint = credentials.endpoint
        self.verify(credentials)
        username = endpoint.username
        address = username if "@" in username else f"{username}@{endpoint.host}"
        log.info("IMAP login verified", extra={"account_id": account_id, "imap_host": endpoint.host})
        return LinkedIdentity(
            address=address,
            display_name=display_name or address,
            # Who the mailbox is: re-linking must log in to the same one (a new password is fine).
            provider_user_id=f"imap:{endpoint.host.lower()}:{endpoint.port}:{username}",
            credential=credentials.to_json(),
            credential_kind=IMAP,
        )

    def verify(self, credentials: ImapCredentials) -> None:
        """Log in and list the folders once; every failure becomes a 400 with a fixed message (503 when busy)."""
        endpoint = credentials.endpoint
        try:
            kind = self._checks.run(lambda: self._check(credentials))
        except ProviderUnavailable as exc:   # the pool's own deadline
            log.info("IMAP login check failed: %s", exc.message, extra={"imap_host": endpoint.host})
            raise _failure("imap_timeout", endpoint) from exc
        if kind is not None:
            raise _failure(kind, endpoint)

    def _check(self, credentials: ImapCredentials) -> str | None:
        """On a check thread: None when the mailbox works, else the kind of failure (a ``_FAILURES`` key)."""
        endpoint = credentials.endpoint
        try:
            session = self._connect(endpoint, lambda _force: credentials.password,
                                    timeout_s=self._settings.imap_timeout_s,
                                    connect_timeout_s=self._settings.imap_verify_timeout_s,
                                    allow_insecure=self._settings.imap_allow_insecure, policy=self._policy)
        except AddressRefused:
            return "address_not_allowed"
        except ProviderAuthError:
            return "login_failed"
        except ProviderError as exc:
            # The details (the server's words) are for the log only.
            log.info("IMAP login check failed: %s", exc.message, extra={"imap_host": endpoint.host,
                                                                        "error_code": exc.code})
            return _kind_of(exc)
        try:
            if not session.has("IMAP4REV1") and not session.has("IMAP4REV2"):
                return "imap_not_imap"
            if not any(m.name.upper() == "INBOX" for m in session.list_mailboxes()):
                return "no_inbox"
            return None
        except ProviderError as exc:
            log.info("IMAP server failed after login: %s", exc.message, extra={"imap_host": endpoint.host})
            return "failed_after_login"
        finally:
            session.close()

    def complete(self, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        raise InputError("IMAP accounts are linked at once; there is no sign-in callback", code="unsupported_provider")


class SealedCredentials:
    """``TokenProvider`` for IMAP accounts: the sealed settings and password linking stored.

    ``force_refresh`` has nothing to refresh: a password the server refuses
    stays refused (the engine then marks the account ``reauth_required``
    and the user links it again with the new password).
    """

    def __init__(self, tokens: TableTokenStore, kind: str = IMAP) -> None:
        self._tokens = tokens
        self._kind = kind

    def access_token(self, account_id: str, *, force_refresh: bool = False) -> str:
        try:
            stored = self._tokens.read(account_id, self._kind)
        except NotFound:
            stored = None
        if stored is None:
            raise ReauthRequired("no stored IMAP login for this account; link it again")
        return stored.plaintext
