"""The IMAP provider factory's connections: what each one costs before the server is even asked.

Making a default TLS context loads the system's CA bundle (~25 ms of CPU).
The factory connects for every folder round, STATUS poll and listener, so a
plaintext connection makes none and TLS connections share the factory's one.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from devhost.services.process import free_port
from mailsync.errors import ProviderUnavailable
from mailsync.models import Account, AccountStatus, Provider
from mailsync.providers.imap import ImapCredentials, ImapProviderFactory
from mailsync.providers.imap_session import ImapEndpoint
from mailsync.settings import Settings
from tests.fixtures.dovecot import LOOPBACK_HOSTS, ImapUser


class _Stored:
    """The token store's answer for one account: its sealed IMAP settings."""

    def __init__(self, credentials: ImapCredentials) -> None:
        self._json = credentials.to_json()

    def access_token(self, account_id: str, *, force_refresh: bool = False) -> str:
        return self._json


def _factory(endpoint: ImapEndpoint, password: str = "") -> ImapProviderFactory:
    settings = replace(Settings(), imap_allow_insecure=True, imap_allowed_hosts=tuple(LOOPBACK_HOSTS.split(",")))
    return ImapProviderFactory(settings, _Stored(ImapCredentials(endpoint, password)))


@pytest.fixture
def contexts_made(monkeypatch: pytest.MonkeyPatch) -> list[ssl.SSLContext]:
    """Every default TLS context made from here on (still real ones)."""
    made: list[ssl.SSLContext] = []
    real: Callable[..., ssl.SSLContext] = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = real(*args, **kwargs)
        made.append(context)
        return context

    monkeypatch.setattr(ssl, "create_default_context", counting)
    return made


def test_plaintext_connections_make_no_tls_context(imap_user: ImapUser, contexts_made: list[ssl.SSLContext]) -> None:
    factory = _factory(ImapEndpoint(imap_user.host, imap_user.port, "none", imap_user.username), imap_user.password)
    for _ in range(2):
        session = factory.connect("acc-plain")
        assert any(m.name == "INBOX" for m in session.list_mailboxes())
        session.close()
    assert contexts_made == []


def test_tls_connections_share_the_factorys_context(contexts_made: list[ssl.SSLContext]) -> None:
    closed = free_port()   # nothing listens: each attempt is refused after its context was chosen
    factory = _factory(ImapEndpoint("127.0.0.1", closed, "tls", "someone"), "secret")
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            factory.connect("acc-tls")
    assert len(contexts_made) == 1
    provider = factory.open(_account("acc-tls"))
    with pytest.raises(ProviderUnavailable):
        provider.folder_changes(None)
    assert len(contexts_made) == 1


def _account(account_id: str) -> Account:
    now = datetime.now(UTC)
    return Account(account_id=account_id, provider=Provider.IMAP, status=AccountStatus.SYNCING,
                   access_token_hash="x", created_at=now, updated_at=now)
