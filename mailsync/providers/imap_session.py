"""One IMAP connection for mailsync: connect, log in, the few commands we use, errors mapped once.

Everything that touches ``imapclient`` goes through :class:`ImapSession`
(the provider, the linker's login check, the STATUS poller, the listener),
so the mapping from IMAP trouble to the project's errors lives here:

=====================================================  =========================================
what happened                                          raised
=====================================================  =========================================
connection refused / reset / timed out, TLS failure,   ``ProviderUnavailable`` (the session is
``* BYE``, a connection cut mid-response               dead; open a new one)
``NO`` to a command (``[UNAVAILABLE]``, ``[LIMIT]``,   ``ProviderUnavailable`` (the session is
``[SERVERBUG]``, ...)                                  still usable)
``NO [NONEXISTENT]`` / "doesn't exist" on SELECT       ``NotFound`` (the folder is gone)
``BAD`` (we sent something the server did not          ``ProviderError`` (a bug or an
understand)                                            unsupported server: not retried blindly)
login refused (``NO [AUTHENTICATIONFAILED]``, SASL)    ``ProviderAuthError``
a response imapclient cannot parse                     ``MalformedResponse``
=====================================================  =========================================

Commands imapclient has no method for — ``EXAMINE mailbox (QRESYNC (...))``
and ``UID FETCH ... (CHANGEDSINCE n)`` over a range — are sent through
imapclient's own command writer (``_raw_command``) and its FETCH parser;
only the bookkeeping imaplib keeps for SELECT (state, read-only) is set by
hand. Nothing here writes protocol bytes itself.

SASL XOAUTH2 (Gmail, Outlook.com): the initial client response is
``user=<username>^Aauth=Bearer <token>^A^A`` (``xoauth2_string``), sent by
imapclient's ``oauth2_login``; a refused token is retried once with a
forced refresh from the token provider.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError, ProtocolError
from imapclient.imap_utf7 import decode as decode_utf7
from imapclient.response_parser import parse_fetch_response, parse_response

from mailsync.errors import (
    InputError,
    MailsyncError,
    MalformedResponse,
    NotFound,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
)
from mailsync.providers.imap_fetch import parse_fetch
from mailsync.security.outbound import STRICT, OutboundPolicy, ResolvedHost

log = logging.getLogger("mailsync.providers.imap")

SECURITY_MODES = ("tls", "starttls", "none")
AUTH_MODES = ("password", "xoauth2")
_OK_CODE = re.compile(rb"\[([A-Z-]+)(?: ([^\]]*))?\]")


@dataclass(frozen=True)
class ImapEndpoint:
    """Where and how to log in (the account's stored IMAP settings, minus the secret)."""

    host: str
    port: int
    security: str = "tls"
    username: str = ""
    auth: str = "password"

    def __post_init__(self) -> None:
        if self.security not in SECURITY_MODES:
            raise InputError(f"security must be one of {', '.join(SECURITY_MODES)}", code="invalid_security")
        if self.auth not in AUTH_MODES:
            raise InputError(f"auth must be one of {', '.join(AUTH_MODES)}", code="invalid_auth")

    def describe(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SelectInfo:
    """What SELECT/EXAMINE told us about a folder."""

    name: str
    uidvalidity: int
    uidnext: int
    exists: int
    highestmodseq: int | None              # None: NOMODSEQ, or CONDSTORE not offered
    vanished: tuple[bytes, ...] = ()       # QRESYNC: VANISHED (EARLIER) sets
    changed: dict[int, dict[bytes, Any]] = field(default_factory=dict)   # QRESYNC: FETCH since modseq


@dataclass(frozen=True)
class MailboxEntry:
    """One LIST line (and its STATUS, when the server returned one)."""

    name: str
    delimiter: str | None
    flags: frozenset[str]                  # lower-case, e.g. "\\noselect", "\\sent"
    messages: int | None = None
    unseen: int | None = None
    uidnext: int | None = None
    uidvalidity: int | None = None
    highestmodseq: int | None = None


def xoauth2_string(username: str, token: str) -> str:
    """The SASL XOAUTH2 initial client response (Google's and Microsoft's documented format)."""
    return f"user={username}\x01auth=Bearer {token}\x01\x01"


class Xoauth2:
    """The XOAUTH2 SASL exchange: the initial response, then an empty reply to an error challenge.

    On failure Gmail and Outlook.com send a continuation carrying a JSON
    error and expect an empty response before their tagged NO; answering
    it with the token again would be a protocol error.
    """

    def __init__(self, username: str, token: str) -> None:
        self._initial = xoauth2_string(username, token).encode("utf-8")
        self.steps = 0

    def __call__(self, challenge: bytes) -> bytes:
        self.steps += 1
        return self._initial if self.steps == 1 else b""


def _message(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return text[:300]


@contextlib.contextmanager
def imap_errors(what: str, on_dead: Callable[[], None] | None = None) -> Iterator[None]:
    """Translate imapclient / socket failures of ``what`` into mailsync errors (see the module table)."""
    try:
        yield
    except MailsyncError:
        raise
    except LoginError as exc:
        raise ProviderAuthError(f"the IMAP server refused the login: {_message(exc)}") from exc
    except (IMAPClientAbortError, OSError, EOFError, ssl.SSLError) as exc:
        # imaplib raises abort for BYE and for a connection cut mid-response; the socket is gone either way.
        if on_dead is not None:
            on_dead()
        if isinstance(exc, TimeoutError):
            raise ProviderUnavailable(f"{what}: the IMAP server did not answer in time", retry_after_s=5.0) from exc
        raise ProviderUnavailable(f"{what}: IMAP connection lost ({_message(exc)})", retry_after_s=2.0) from exc
    except ProtocolError as exc:
        raise MalformedResponse(f"{what}: unreadable IMAP response ({_message(exc)})") from exc
    except IMAPClientError as exc:
        text = _message(exc)
        if "NONEXISTENT" in text or "doesn't exist" in text.lower() or "does not exist" in text.lower():
            raise NotFound(f"{what}: the folder does not exist (any more)") from exc
        if "command error: BAD" in text or " BAD " in text:
            raise ProviderError(f"{what}: the IMAP server did not accept the command ({text})",
                                code="imap_bad_command") from exc
        raise ProviderUnavailable(f"{what}: the IMAP server said no ({text})", retry_after_s=5.0) from exc
    except (ValueError, IndexError, TypeError, KeyError) as exc:
        raise MalformedResponse(f"{what}: unreadable IMAP response ({_message(exc)})") from exc


class ImapSession:
    """A logged-in connection. Not thread-safe: one caller at a time (the provider holds a lock)."""

    def __init__(self, client: IMAPClient, endpoint: ImapEndpoint) -> None:
        self.client = client
        self.endpoint = endpoint
        self.alive = True
        self.selected: SelectInfo | None = None
        self.enabled: frozenset[str] = frozenset()
        # imapclient turns imaplib's protocol trace on (every line to a DEBUG logger). Off: the lines
        # hold mail content (never logged), and formatting them cost ~10% of an initial sync.
        client._imap.debug = 0
        with imap_errors("capabilities", self._dead):
            # Ask again after login: the pre-login list is shorter (Dovecot adds CONDSTORE, QRESYNC...).
            client._cached_capabilities = None
            self.capabilities = frozenset(c.decode("ascii", "replace").upper() for c in client.capabilities())

    # --- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(cls, endpoint: ImapEndpoint, secret: Callable[[bool], str], *, timeout_s: float = 20.0,
                allow_insecure: bool = False, ssl_context: ssl.SSLContext | None = None,
                policy: OutboundPolicy = STRICT, connect_timeout_s: float | None = None) -> ImapSession:
        """Connect and log in. ``secret(force_refresh)`` gives the password or the XOAUTH2 access token.

        ``timeout_s`` bounds every read after the greeting; ``connect_timeout_s``
        (default: the same) the TCP connect, the TLS handshake and the server's
        greeting (imapclient reads it before switching to the read timeout) —
        short for a login check, so a host that does not even greet is answered fast.

        The host is resolved and checked against the outbound address
        ``policy`` first (``AddressRefused`` before any connection), and the
        connection goes to the checked address (mailsync.security.outbound).

        A refused XOAUTH2 token is refreshed once (as for Graph's 401), on a
        new connection: Dovecot holds a second attempt on the same one back
        for seconds, and Gmail may close it.
        """
        if endpoint.security == "none" and not allow_insecure:
            raise InputError("plaintext IMAP (security \"none\") is disabled here; use tls or starttls",
                             code="insecure_imap_refused")
        target = policy.resolve(endpoint.host, endpoint.port)
        # A default context loads the system's CA bundle: ~25 ms of CPU each time, which was ~14 % of the
        # syncing host's CPU in bench/imap_initial_sync.py (a connection per folder round and per poll).
        # Plaintext needs none; callers that connect often pass one they keep (ImapProviderFactory).
        context = None if endpoint.security == "none" else (ssl_context or ssl.create_default_context())
        timeouts = SocketTimeout(connect=connect_timeout_s or timeout_s, read=timeout_s)
        try:
            return cls._open(endpoint, target, policy, secret(False), timeouts, context)
        except ProviderAuthError:
            if endpoint.auth != "xoauth2":
                raise
        return cls._open(endpoint, target, policy, secret(True), timeouts, context)

    @classmethod
    def _open(cls, endpoint: ImapEndpoint, target: ResolvedHost, policy: OutboundPolicy, secret: str,
              timeouts: SocketTimeout, context: ssl.SSLContext | None) -> ImapSession:
        # The exception messages go to logs; callers facing a user (the linker) map the codes to
        # fixed sentences and never show what the server said.
        where = endpoint.describe()
        client: IMAPClient | None = None
        try:
            client = _PinnedClient(target, policy, ssl=endpoint.security == "tls",
                                   ssl_context=context if endpoint.security == "tls" else None, timeout=timeouts)
            client.normalise_times = False
            if endpoint.security == "starttls":
                client.starttls(context)
        except TimeoutError as exc:
            _close_quietly(client)
            raise ProviderUnavailable(f"the IMAP server {where} did not answer in time "
                                      f"(connect {timeouts.connect:g} s, read {timeouts.read:g} s)",
                                      retry_after_s=30.0, code="imap_timeout") from exc
        except ssl.SSLError as exc:
            _close_quietly(client)
            raise ProviderUnavailable(f"TLS with the IMAP server {where} failed: {_message(exc)}",
                                      retry_after_s=30.0, code="imap_tls_failed") from exc
        except OSError as exc:
            _close_quietly(client)
            raise ProviderUnavailable(f"could not reach the IMAP server {where}: {_message(exc)}",
                                      retry_after_s=30.0, code="imap_unreachable") from exc
        except IMAPClientError as exc:
            # No IMAP greeting (an SMTP or HTTP server, a banner), or no STARTTLS on offer.
            _close_quietly(client)
            raise ProviderUnavailable(f"the server at {where} did not speak IMAP: {_message(exc)}",
                                      retry_after_s=30.0, code="imap_not_imap") from exc
        try:
            with imap_errors("login"):
                if endpoint.auth == "password":
                    client.login(endpoint.username, secret)
                else:
                    client.sasl_login("XOAUTH2", Xoauth2(endpoint.username, secret))
            return cls(client, endpoint)
        except BaseException:
            _close_quietly(client)
            raise

    def _dead(self) -> None:
        self.alive = False
        self.selected = None

    def close(self) -> None:
        if not self.alive:
            _close_quietly(self.client)
            return
        self.alive = False
        try:
            self.client.logout()
        except Exception:
            _close_quietly(self.client)

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return imap_errors(what, self._dead)

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    def enable(self, *extensions: str) -> frozenset[str]:
        """ENABLE what the server offers of ``extensions`` (once per session)."""
        wanted = [e for e in extensions if self.has(e) and e not in self.enabled]
        if not wanted or not self.has("ENABLE"):
            return self.enabled
        with self.errors("ENABLE"):
            done = self.client.enable(*wanted)
        self.enabled = self.enabled | {d.decode("ascii", "replace").upper() if isinstance(d, bytes) else str(d)
                                       for d in done}
        return self.enabled

    # --- folders --------------------------------------------------------------------------------

    def list_mailboxes(self, status_items: Sequence[str] = ("MESSAGES", "UNSEEN"), *,
                       status_for: Callable[[MailboxEntry], bool] | None = None) -> list[MailboxEntry]:
        """Every mailbox with SPECIAL-USE flags and STATUS ``status_items``.

        One round trip with LIST-STATUS (RFC 5819); without it, one STATUS per
        selectable mailbox (or per mailbox ``status_for`` accepts).
        """
        with self.errors("LIST"):
            imap = self.client._imap
            imap.untagged_responses = {}
            extended = self.has("LIST-EXTENDED")
            status = self.has("LIST-STATUS") and bool(status_items)
            wanted = [i for i in status_items if i != "HIGHESTMODSEQ" or self.has("CONDSTORE")]
            returns: list[bytes] = []
            if extended and self.has("SPECIAL-USE"):
                returns.append(b"SPECIAL-USE")
            if status:
                returns.append(b"STATUS (" + " ".join(wanted).encode() + b")")
            args = [b'""', b'"*"']
            if extended and returns:
                args += [b"RETURN", b"(" + b" ".join(returns) + b")"]
            lines = self.client._raw_command_untagged(b"LIST", args, uid=False, response_name="LIST")
            statuses = imap.untagged_responses.pop("STATUS", [])
            imap.untagged_responses = {}
            entries = self._entries(lines)
            counts = {name: items for name, items in (_parse_status(line) for line in statuses if line)}
        found: list[MailboxEntry] = []
        for name, delimiter, flags in entries:
            entry = MailboxEntry(name=name, delimiter=delimiter, flags=flags)
            items = counts.get(name)
            if (items is None and wanted and not status and not flags & {"\\noselect", "\\nonexistent"}
                    and (status_for is None or status_for(entry))):
                items = self.status(name, wanted)
            items = items or {}
            found.append(MailboxEntry(name=name, delimiter=delimiter, flags=flags, messages=items.get("MESSAGES"),
                                      unseen=items.get("UNSEEN"), uidnext=items.get("UIDNEXT"),
                                      uidvalidity=items.get("UIDVALIDITY"), highestmodseq=items.get("HIGHESTMODSEQ")))
        return found

    def _entries(self, lines: Sequence[Any]) -> list[tuple[str, str | None, frozenset[str]]]:
        found: list[tuple[str, str | None, frozenset[str]]] = []
        for flags, delimiter, name in self.client._proc_folder_list(list(lines)):
            text = name if isinstance(name, str) else str(name)
            found.append((text, delimiter.decode("utf-8", "replace") if isinstance(delimiter, bytes) else None,
                          frozenset(f.decode("ascii", "replace").lower() for f in flags)))
        return found

    def status(self, name: str, items: Sequence[str]) -> dict[str, int]:
        """STATUS of one mailbox (``{"MESSAGES": 3, ...}``)."""
        with self.errors(f"STATUS {name}"):
            raw = self.client.folder_status(name, list(items))
        return {(k.decode() if isinstance(k, bytes) else str(k)).upper(): int(v) for k, v in raw.items()}

    # --- selecting ------------------------------------------------------------------------------

    def examine(self, name: str, *, qresync: tuple[int, int] | None = None, condstore: bool = False,
                reuse: bool = False) -> SelectInfo:
        """EXAMINE (read-only SELECT); with ``qresync=(uidvalidity, modseq)`` also the changes since.

        ``reuse`` keeps an existing selection of the same folder (walk pages
        need no fresh counters).
        """
        if reuse and qresync is None and self.selected is not None and self.selected.name == name:
            return self.selected
        params: list[bytes] = []
        if qresync is not None:
            params = [b"(QRESYNC (%d %d))" % qresync]
        elif condstore and "CONDSTORE" not in self.enabled and "QRESYNC" not in self.enabled:
            params = [b"(CONDSTORE)"]
        with self.errors(f"EXAMINE {name}"):
            imap = self.client._imap
            imap.untagged_responses = {}
            self.selected = None
            typ, data = self.client._raw_command(b"EXAMINE", [self.client._normalise_folder(name), *params],
                                                 uid=False)
            if typ != "OK":
                imap.state = "AUTH"
                raise IMAPClientError(f"EXAMINE failed: {data[0]!r}")
            # What imaplib's own select() records, so its later UID commands are allowed.
            imap.state = "SELECTED"
            imap.is_readonly = True
            info = self._select_info(name, imap.untagged_responses, data)
            imap.untagged_responses = {}
        self.selected = info
        return info

    @staticmethod
    def _select_info(name: str, untagged: dict[str, list[Any]], tagged: Sequence[Any]) -> SelectInfo:
        codes: dict[bytes, bytes] = {}
        for line in [*untagged.get("OK", []), *(t for t in tagged if isinstance(t, bytes))]:
            if isinstance(line, bytes):
                for match in _OK_CODE.finditer(line):
                    codes[match.group(1)] = match.group(2) or b""
        try:
            uidvalidity = int(codes.get(b"UIDVALIDITY") or untagged["UIDVALIDITY"][0])
            exists = int(untagged["EXISTS"][-1]) if "EXISTS" in untagged else 0
        except (KeyError, IndexError, ValueError) as exc:
            raise MalformedResponse(f"EXAMINE {name}: no UIDVALIDITY/EXISTS in the answer") from exc
        uidnext_raw = codes.get(b"UIDNEXT") or (untagged.get("UIDNEXT") or [b""])[0]
        modseq_raw = codes.get(b"HIGHESTMODSEQ") or (untagged.get("HIGHESTMODSEQ") or [b""])[0]
        uidnext = int(uidnext_raw) if uidnext_raw else 0
        highestmodseq = None if b"NOMODSEQ" in codes or not modseq_raw else int(modseq_raw)
        vanished = tuple(v for v in untagged.get("VANISHED", []) if isinstance(v, bytes))
        changed = by_uid(untagged.get("FETCH") or [])
        return SelectInfo(name=name, uidvalidity=uidvalidity, uidnext=uidnext, exists=exists,
                          highestmodseq=highestmodseq, vanished=vanished, changed=changed)

    # --- reading -----------------------------------------------------------------------------------

    def uid_search(self, criteria: str) -> list[int]:
        """``UID SEARCH <criteria>`` (e.g. ``UID 1:500`` or ``ALL``) → UIDs, ascending."""
        with self.errors("UID SEARCH"):
            found = self.client.search(criteria)
        return sorted(int(u) for u in found)

    def uid_sort_arrival_desc(self) -> list[int]:
        with self.errors("UID SORT"):
            return [int(u) for u in self.client.sort(["REVERSE ARRIVAL"])]

    def uid_fetch(self, uids: str, items: str, modifiers: str | None = None) -> dict[int, dict[bytes, Any]]:
        """``UID FETCH <uid set> (<items>) [(<modifiers>)]`` → {uid: {item: value}}.

        Unsolicited FETCH responses (another client changed flags while we
        are selected) carry no UID or a UID outside the set; they are left out.
        """
        if not uids:
            return {}
        with self.errors("UID FETCH"):
            imap = self.client._imap
            imap.untagged_responses = {}
            args = ["UID", "FETCH", uids, f"({items})"]
            if modifiers:
                args.append(f"({modifiers})")
            tag = imap._command(*args)
            typ, data = imap._command_complete("FETCH", tag)
            if typ != "OK":
                raise IMAPClientError(f"fetch failed: {data[0]!r}")
            lines = imap.untagged_responses.pop("FETCH", [])
            imap.untagged_responses = {}
            return by_uid(lines)

    # --- idle (the listener) -----------------------------------------------------------------------------

    def idle_start(self) -> None:
        with self.errors("IDLE"):
            self.client.idle()

    def idle_wait(self, timeout_s: float) -> list[Any]:
        with self.errors("IDLE"):
            return list(self.client.idle_check(timeout=timeout_s))

    def idle_done(self) -> None:
        with self.errors("IDLE"):
            self.client.idle_done()

    def socket(self) -> socket.socket:
        return self.client.socket()  # type: ignore[no-any-return]

    def raw_command(self, command: bytes, args: list[bytes]) -> list[Any]:
        """A command with untagged answers of the same name (NOTIFY, ...)."""
        with self.errors(command.decode()):
            return list(self.client._raw_command_untagged(command, args, uid=False))


class LazySession:
    """The one connection of an owner that is called from several threads (the provider, the actions).

    Opened on first use, ``ENABLE``s ``extensions`` (those the server
    offers), and opened again on the next use after it died: a fault
    raised ``ProviderUnavailable`` and marked the session dead, the caller
    retries later, and that retry must not reuse the broken socket. A
    re-entrant lock serialises whole exchanges (SELECT then FETCH must not
    interleave with another thread's SELECT on the same connection).
    """

    def __init__(self, connect: Callable[[], ImapSession], extensions: Sequence[str] = ()) -> None:
        self._connect = connect
        self._extensions = tuple(extensions)
        self._session: ImapSession | None = None
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def use(self) -> Iterator[ImapSession]:
        """The live session, held for the ``with`` block (nested uses by the same thread are fine)."""
        with self._lock:
            session = self._session
            if session is None or not session.alive:
                if session is not None:
                    session.close()
                self._session = None
                session = self._connect()
                try:
                    session.enable(*self._extensions)
                except BaseException:
                    session.close()
                    raise
                self._session = session
            yield session

    def close(self) -> None:
        """Log out (or drop a dead connection); the next ``use`` opens a new one."""
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None


def by_uid(lines: Sequence[Any]) -> dict[int, dict[bytes, Any]]:
    """FETCH responses keyed by UID; responses without a UID (unsolicited flag updates) are dropped.

    Parsed keyed by sequence number first: imapclient's UID-keyed parse
    would merge a UID-less response for sequence number n into the entry
    of UID n, which is another message.
    """
    if not lines:
        return {}
    found: dict[int, dict[bytes, Any]] = {}
    parsed = parse_fetch(lines)   # the plain shapes, fast; None: imapclient reads it (see imap_fetch)
    if parsed is None:
        parsed = parse_fetch_response(list(lines), False, False)
    for item in parsed.values():
        uid = item.get(b"UID")
        if isinstance(uid, int):
            found[uid] = item
    return found


def _parse_status(line: bytes) -> tuple[str, dict[str, int]]:
    parsed = parse_response([line])
    name_raw, items = parsed[0], parsed[-1]
    if isinstance(name_raw, int):
        name = str(name_raw)
    elif isinstance(name_raw, bytes):
        name = decode_utf7(name_raw)
    else:
        name = str(name_raw)
    values: dict[str, int] = {}
    for key, value in zip(items[::2], items[1::2], strict=False):
        values[key.decode("ascii", "replace").upper() if isinstance(key, bytes) else str(key)] = int(value)
    return name, values


class _PinnedClient(IMAPClient):  # type: ignore[misc]  # imapclient is untyped
    """An IMAPClient whose socket goes to the policy-checked address, not to a second lookup of the name.

    imapclient (and imaplib under it) would call ``socket.create_connection``
    with the host *name*, resolving it again; a name with TTL 0 could then
    answer with a loopback address (DNS rebinding). Only the TCP connect is
    replaced: ``host`` stays the name, so the TLS handshake (implicit, or
    imaplib's STARTTLS) sends it as SNI and checks the certificate against it.
    """

    def __init__(self, target: ResolvedHost, policy: OutboundPolicy, **kwargs: Any) -> None:
        self._target = target
        self._policy = policy
        super().__init__(target.host, target.port, **kwargs)

    def _create_IMAP4(self) -> imaplib.IMAP4:
        timeout = getattr(self._timeout, "connect", None)
        context = (self.ssl_context or ssl.create_default_context()) if self.ssl else None
        return _PinnedIMAP4(lambda t: self._policy.connect(self._target, t), self._target, timeout, context)


class _PinnedIMAP4(imaplib.IMAP4):
    """imaplib's IMAP4 (or IMAP4-over-TLS) on a socket to a checked address."""

    def __init__(self, open_socket: Callable[[float | None], socket.socket], target: ResolvedHost,
                 timeout: float | None, context: ssl.SSLContext | None) -> None:
        self._open_socket = open_socket
        self._context = context
        super().__init__(target.host, target.port, timeout=timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = self._open_socket(timeout)
        if self._context is None:
            return sock
        try:
            return self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _close_quietly(client: IMAPClient | None) -> None:
    if client is None:
        return
    with contextlib.suppress(Exception):
        client.shutdown()


