"""Linking IMAP accounts: the login is verified first, the password sealed like a token cache, bad input is a 400.

The LinkingService with the real tables (Azurite), the real queue, and
Dovecot; the HTTP path through the devhost is in tests/sync/test_imap_end_to_end.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from mailsync.errors import AddressRefused, Conflict, InputError
from mailsync.jobs import JobKind, decode_job
from mailsync.linking.access import AccountAccess
from mailsync.linking.imap import IMAP, ImapLinker, SealedCredentials
from mailsync.linking.return_urls import ReturnUrlPolicy
from mailsync.linking.service import LinkingService
from mailsync.models import AccountStatus, Provider
from mailsync.providers.imap import ImapCredentials, ImapProviderFactory
from mailsync.settings import Settings
from mailsync.storage import connection
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.sync import policy
from tests.fixtures.dovecot import LOOPBACK_HOSTS, DovecotServer, ImapUser
from tests.linking.tables import LinkingTables, linking_tables


@pytest.fixture
def settings(storage_settings: Settings) -> Settings:
    return replace(storage_settings, imap_allow_insecure=True, imap_timeout_s=15.0,
                   imap_allowed_hosts=tuple(LOOPBACK_HOSTS.split(",")))


@pytest.fixture
def tables(settings: Settings) -> LinkingTables:
    return linking_tables(settings)


def service(settings: Settings, tables: LinkingTables) -> LinkingService:
    return LinkingService(
        accounts=tables.accounts, tokens=tables.tokens, flows=tables.flows, access=AccountAccess(tables.accounts),
        jobs=AzureJobQueue(settings),
        return_urls=ReturnUrlPolicy.from_base(settings.return_url_allowlist, settings.public_base_url),
        linkers={Provider.IMAP: ImapLinker(settings)})


def body(user: ImapUser, **changes: Any) -> dict[str, Any]:
    return {"provider": "imap", "host": user.host, "port": user.port, "security": "none",
            "username": user.username, "password": user.password, **changes}


def jobs(settings: Settings) -> list[Any]:
    client = connection.queue_client(settings, settings.sync_queue_name)
    try:
        return [decode_job(m.content) for m in client.peek_messages(max_messages=32)]
    except Exception:   # the queue is created on first enqueue
        return []


def rows(tables: LinkingTables) -> list[dict[str, Any]]:
    return [dict(e) for e in tables.accounts_table.list_entities()]


def test_link_verifies_the_login_and_seals_the_password(settings: Settings, tables: LinkingTables,
                                                        imap_user: ImapUser) -> None:
    result = service(settings, tables).start(body(imap_user, display_name="Test Mailbox"))
    assert result.created and result.status == AccountStatus.SYNCING and result.access_token
    account = tables.accounts.get(result.account_id)
    assert account is not None and account.provider == Provider.IMAP
    assert account.address == f"{imap_user.username}@{imap_user.host}" and account.display_name == "Test Mailbox"
    cred = tables.accounts_table.get_entity(result.account_id, "cred-imap")
    assert imap_user.password.encode() not in bytes(cred["blob"]), "sealed, never in clear"
    secret = SealedCredentials(tables.tokens).access_token(result.account_id)
    stored = ImapCredentials.from_json(secret)
    assert stored.password == imap_user.password and stored.endpoint.port == imap_user.port
    assert [(j.kind, j.account_id) for j in jobs(settings)] == [(JobKind.SYNC_FOLDERS.value, result.account_id)]
    # What the sync workers get from it: a working session.
    session = ImapProviderFactory(settings, SealedCredentials(tables.tokens)).connect(result.account_id)
    assert any(m.name == "INBOX" for m in session.list_mailboxes())
    session.close()
    assert orjson.loads(secret)["host"] == imap_user.host


def test_every_later_connection_applies_the_policy_too(settings: Settings, tables: LinkingTables,
                                                       imap_user: ImapUser) -> None:
    """The sync engine, the poller and the listener all connect through the factory: it checks every time."""
    result = service(settings, tables).start(body(imap_user))
    strict = ImapProviderFactory(replace(settings, imap_allowed_hosts=()), SealedCredentials(tables.tokens))
    with pytest.raises(AddressRefused) as refused:
        strict.connect(result.account_id)   # as if the name had moved into a private range since linking
    assert refused.value.code == "address_not_allowed"
    assert not policy.retryable(refused.value), "the engine parks the account instead of hammering"


def test_wrong_password_is_a_clear_400_and_nothing_is_stored(settings: Settings, tables: LinkingTables,
                                                             dovecot_refusals: DovecotServer) -> None:
    user = dovecot_refusals.add_user()
    with pytest.raises(InputError) as refused:
        service(settings, tables).start(body(user, password="not-the-password"))
    assert refused.value.http_status == 400 and refused.value.code == "imap_login_failed"
    assert "refused the user name or password" in refused.value.message
    assert rows(tables) == [] and jobs(settings) == []


def test_unreachable_server_is_a_clear_400(settings: Settings, tables: LinkingTables, imap_user: ImapUser) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]    # nothing listens here once closed
    with pytest.raises(InputError) as refused:
        service(settings, tables).start(body(imap_user, port=port))
    assert refused.value.code == "imap_unreachable" and f"127.0.0.1:{port}" in refused.value.message
    assert rows(tables) == []


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never says a word (a firewall that swallows, a server that hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_server_that_never_answers_times_out_with_a_clear_error(settings: Settings, tables: LinkingTables,
                                                                  imap_user: ImapUser, silent_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(InputError) as refused:
        service(replace(settings, imap_verify_timeout_s=1.5), tables).start(body(imap_user, port=silent_server))
    assert refused.value.code == "imap_unreachable"
    assert "did not answer in time" in refused.value.message or "timed out" in refused.value.message
    assert time.monotonic() - started < 10, "IMAP_VERIFY_TIMEOUT_S bounds the wait for the greeting"
    assert rows(tables) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "localhost", "[::1]", "::1",
                                  "::ffff:127.0.0.1", "0.0.0.0", "169.254.169.254", "10.0.0.1"])
def test_special_use_hosts_are_refused_by_the_policy_before_any_connection(
        storage_settings: Settings, tables: LinkingTables, imap_user: ImapUser, host: str) -> None:
    strict = replace(storage_settings, imap_allow_insecure=True)   # no IMAP_ALLOWED_HOSTS: production
    with pytest.raises(InputError) as refused:
        service(strict, tables).start(body(imap_user, host=host))
    assert refused.value.http_status == 400 and refused.value.code == "address_not_allowed"
    assert "outbound address policy" in refused.value.message
    assert rows(tables) == []


@pytest.fixture
def banner_server() -> Iterator[int]:
    """An SMTP-like server: a greeting banner, then its own words to whatever is sent (here: STARTTLS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            with conn:
                conn.sendall(b"220 internal-mx.corp.example ESMTP Postfix (secret-build 3.7.2)\r\n")
                conn.settimeout(2)
                try:
                    conn.recv(1024)
                    conn.sendall(b"502 5.5.2 internal-mx.corp.example: command not recognized\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize("security", ["starttls", "none"])
def test_what_a_server_says_is_never_echoed(settings: Settings, tables: LinkingTables, imap_user: ImapUser,
                                           banner_server: int, security: str) -> None:
    with pytest.raises(InputError) as refused:
        service(settings, tables).start(body(imap_user, port=banner_server, security=security))
    assert refused.value.code == "imap_unsupported"
    assert "not an IMAP server" in refused.value.message
    assert "internal-mx" not in refused.value.message and "Postfix" not in refused.value.message
    assert rows(tables) == []


@pytest.mark.parametrize(("changes", "code"), [
    ({"security": "none"}, "insecure_imap_refused"),
    ({"host": ""}, "invalid_imap_settings"),
    ({"host": "bad host/name"}, "invalid_imap_settings"),
    ({"port": 0}, "invalid_imap_settings"),
    ({"port": "x"}, "invalid_imap_settings"),
    ({"security": "ssl3"}, "invalid_imap_settings"),
    ({"username": None}, "invalid_imap_settings"),
    ({"password": 12}, "invalid_imap_settings"),
    ({"password": "a\nb"}, "invalid_imap_settings"),
    ({"imap_extra": True}, "invalid_imap_settings"),
])
def test_bad_settings_are_400s(storage_settings: Settings, tables: LinkingTables, imap_user: ImapUser,
                               changes: dict[str, Any], code: str) -> None:
    # Plaintext is refused by default: only this test's other cases use a setting that allows it.
    settings = replace(storage_settings, imap_allowed_hosts=tuple(LOOPBACK_HOSTS.split(",")))
    settings = settings if changes == {"security": "none"} else replace(settings, imap_allow_insecure=True)
    with pytest.raises(InputError) as refused:
        service(settings, tables).start(body(imap_user, **changes))
    assert refused.value.code == code
    assert rows(tables) == []


def test_relink_with_a_new_password_and_address_rules(settings: Settings, tables: LinkingTables,
                                                      dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    linking = service(settings, tables)
    first = linking.start(body(user))
    with pytest.raises(Conflict):
        linking.start(body(user))   # the same mailbox on a second account
    account = tables.accounts.get(first.account_id)
    assert account is not None
    tables.accounts.save(replace(account, status=AccountStatus.REAUTH_REQUIRED, error="refused"))
    again = linking.start({**body(user), "account_id": first.account_id}, first.access_token)
    assert not again.created and again.status == AccountStatus.SYNCING
    other = dovecot.add_user()
    with pytest.raises(Conflict) as wrong:
        linking.start({**body(other), "account_id": first.account_id}, first.access_token)
    assert wrong.value.code == "wrong_mailbox"
    linking.unlink(first.account_id, first.access_token)
    assert tables.tokens.read(first.account_id, IMAP) is None
