"""SASL XOAUTH2 against Dovecot's oauth2 passdb, with a local token introspection endpoint.

Google's and Microsoft's IMAP endpoints cannot be reached here; Dovecot's
oauth2 passdb speaks the same XOAUTH2 mechanism and asks an introspection
URL (RFC 7662, ``introspection_mode = post``) whether the bearer token is
active. The endpoint below answers for the tokens the test hands out, so
these tests prove the exact SASL exchange (the token arrives intact and is
checked), the one forced refresh after a refusal, and the provider working
over such a session.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from mailsync.errors import ProviderAuthError
from mailsync.models import Account, AccountStatus, Provider
from mailsync.providers.imap import ImapCredentials, ImapProviderFactory
from mailsync.providers.imap_session import ImapEndpoint, ImapSession
from mailsync.settings import Settings
from tests.fixtures.dovecot import LOOPBACK_HOSTS, DovecotServer, ImapUser, loopback_policy, start_dovecot


@dataclass
class Introspection:
    """RFC 7662 token introspection: ``active`` for the tokens in ``valid`` (token -> username)."""

    valid: dict[str, str] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def serve(self) -> ThreadingHTTPServer:
        introspection = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                token = parse_qs(body).get("token", [""])[0]
                introspection.asked.append(token)
                user = introspection.valid.get(token)
                data = json.dumps({"active": user is not None, "username": user or ""}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")   # else Dovecot waits on a kept-alive socket we closed
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture(scope="module")
def oauth_dovecot() -> Iterator[tuple[DovecotServer, Introspection]]:
    introspection = Introspection()
    http = introspection.serve()
    conf_dir = Path(tempfile.mkdtemp(prefix="mailsync-oauth2-"))
    conf_dir.chmod(0o755)
    conf = conf_dir / "oauth2.conf.ext"
    conf.write_text(f"introspection_mode = post\nintrospection_url = http://127.0.0.1:{http.server_port}/introspect\n"
                    "username_attribute = username\nactive_attribute = active\nactive_value = true\n")
    conf.chmod(0o644)
    extra = ("auth_mechanisms = plain login xoauth2 oauthbearer\n"
             f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {conf}\n}}\n")
    server = start_dovecot(extra=extra, pool=10)
    try:
        yield server, introspection
    finally:
        server.stop()
        http.shutdown()


def _endpoint(user: ImapUser) -> ImapEndpoint:
    return ImapEndpoint(user.host, user.port, "none", user.username, auth="xoauth2")


def test_a_valid_token_logs_in_and_arrives_intact(oauth_dovecot: tuple[DovecotServer, Introspection]) -> None:
    server, introspection = oauth_dovecot
    user = server.add_user()
    token = "ya29.a0Af-H6+/=token.with.odd~chars"
    introspection.valid[token] = user.username
    session = ImapSession.connect(_endpoint(user), lambda _force: token, allow_insecure=True,
                                  policy=loopback_policy())
    assert any(m.name == "INBOX" for m in session.list_mailboxes())
    session.close()
    assert introspection.asked[-1] == token, "Dovecot read exactly our token out of the SASL string"


def test_the_provider_syncs_over_xoauth2_with_tokens_from_the_token_provider(
        oauth_dovecot: tuple[DovecotServer, Introspection]) -> None:
    server, introspection = oauth_dovecot
    user = server.add_user()
    introspection.valid["account-token"] = user.username
    account_id = "acc-xoauth2"

    class Stored:
        def access_token(self, account_id_: str, *, force_refresh: bool = False) -> str:
            assert account_id_ == account_id
            return ImapCredentials(_endpoint(user)).to_json()   # no password stored for XOAUTH2

    class OAuth:
        def access_token(self, account_id_: str, *, force_refresh: bool = False) -> str:
            return "account-token"

    settings = replace(Settings(), imap_allow_insecure=True, imap_allowed_hosts=tuple(LOOPBACK_HOSTS.split(",")))
    factory = ImapProviderFactory(settings, Stored(), oauth_tokens=OAuth())
    now = datetime.now(UTC)
    provider = factory.open(Account(account_id=account_id, provider=Provider.IMAP, status=AccountStatus.SYNCING,
                                    access_token_hash="x", created_at=now, updated_at=now))
    assert "INBOX" in {f.folder_id for f in provider.folder_changes(None).upserts}
    assert provider.message_changes("INBOX", None).cursor
    provider.close()


# Last: after a refusal Dovecot slows every login from this IP for a while (auth penalty).
def test_a_refused_token_is_refreshed_once(oauth_dovecot: tuple[DovecotServer, Introspection]) -> None:
    server, introspection = oauth_dovecot
    user = server.add_user()
    introspection.valid["fresh-token"] = user.username
    asked: list[bool] = []

    def token(force_refresh: bool) -> str:
        asked.append(force_refresh)
        return "fresh-token" if force_refresh else "expired-token"

    ImapSession.connect(_endpoint(user), token, allow_insecure=True, policy=loopback_policy()).close()
    assert asked == [False, True]
    assert introspection.asked[-2:] == ["expired-token", "fresh-token"]


def test_a_token_refused_twice_is_an_auth_error() -> None:
    # No server needed past the first refusal: a password account is never retried, an XOAUTH2 one once.
    calls: list[bool] = []

    def refuse(endpoint: ImapEndpoint, target: object, policy: object, secret: str, timeout_s: float,
               context: object) -> ImapSession:
        calls.append(secret == "fresh")
        raise ProviderAuthError("refused")

    original = ImapSession._open
    ImapSession._open = classmethod(lambda cls, *a: refuse(*a))  # type: ignore[assignment, method-assign]
    try:
        with pytest.raises(ProviderAuthError):
            # A public address (resolved and checked without any lookup); _open is replaced, nothing connects.
            ImapSession.connect(ImapEndpoint("8.8.8.8", 1, "none", "u", auth="xoauth2"),
                                lambda force: "fresh" if force else "old", allow_insecure=True)
        assert calls == [False, True]
        calls.clear()
        with pytest.raises(ProviderAuthError):
            ImapSession.connect(ImapEndpoint("8.8.8.8", 1, "none", "u"), lambda force: "pw", allow_insecure=True)
        assert calls == [False]
    finally:
        ImapSession._open = original  # type: ignore[method-assign]
