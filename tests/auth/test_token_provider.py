"""MSAL adapter and MsalTokenProvider against the Graph sandbox and Azurite.

The sandbox's identity platform is driven through the real MSAL (sandbox
routing), its sign-in form over HTTP like a browser, and tokens are checked
by calling Graph with them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from mailsync.auth.msal_app import MsalApp
from mailsync.auth.sandbox_routing import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from mailsync.auth.token_provider import MsalTokenProvider
from mailsync.errors import ProviderError, ReauthRequired
from mailsync.models import Account, AccountStatus, Provider
from mailsync.settings import Settings
from mailsync.storage.tokens import StoredCredential
from tests.linking.browser import query, submit_sign_in
from tests.linking.tables import LinkingTables, linking_tables

REDIRECT = "http://127.0.0.1:7071/api/oauth/callback"


def msal_for(sandbox_url: str) -> MsalApp:
    return MsalApp(client_id=SANDBOX_CLIENT_ID, client_secret=SANDBOX_CLIENT_SECRET, sandbox_url=sandbox_url)


def sign_in(app: MsalApp, username: str) -> str:
    """A full auth-code flow through MSAL; returns the serialised cache."""
    start = app.start(REDIRECT)
    params = query(submit_sign_in(start.authorize_url, username))
    return app.finish(start.flow, params).cache_state


def me(sandbox_url: str, token: str) -> requests.Response:
    return requests.get(f"{sandbox_url}/v1.0/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def linked_account(t: LinkingTables, cache_state: str, address: str) -> Account:
    now = datetime.now(UTC)
    account = t.accounts.save(Account(account_id=uuid.uuid4().hex, provider=Provider.OUTLOOK,
                                      status=AccountStatus.LINKING, access_token_hash="0" * 64,
                                      created_at=now, updated_at=now))
    return t.accounts.save_with_credential(replace(account, status=AccountStatus.SYNCING, address=address),
                                           cache_state)


@pytest.fixture
def t(storage_settings: Settings) -> LinkingTables:
    return linking_tables(storage_settings)


def test_auth_code_flow_has_pkce_state_and_nonce(graph_sandbox: Any) -> None:
    app = msal_for(graph_sandbox.base_url)
    start = app.start(REDIRECT)
    assert start.authorize_url.startswith(graph_sandbox.base_url + "/common/oauth2/v2.0/authorize?")
    params = query(start.authorize_url)
    assert params["code_challenge_method"] == "S256" and params["code_challenge"]
    assert params["state"] == start.state and params["nonce"]
    assert set(params["scope"].split()) >= {"Mail.ReadWrite", "User.Read", "offline_access"}
    assert "code_verifier" not in start.authorize_url and start.flow["code_verifier"] not in start.authorize_url


def test_finish_wraps_provider_errors(graph_sandbox: Any) -> None:
    app = msal_for(graph_sandbox.base_url)
    start = app.start(REDIRECT)
    denied = query(submit_sign_in(start.authorize_url, None, cancel=True))
    with pytest.raises(ProviderError) as info:
        app.finish(start.flow, denied)
    assert info.value.code == "access_denied"
    assert "cancelled" in info.value.message

    start = app.start(REDIRECT)
    params = query(submit_sign_in(start.authorize_url, graph_sandbox.users[0].mail))
    app.finish(start.flow, params)
    with pytest.raises(ProviderError) as info:  # the same code again: replay
        app.finish(start.flow, params)
    assert info.value.code == "invalid_grant"


def test_token_provider_serves_and_refreshes(graph_sandbox: Any, t: LinkingTables) -> None:
    app = msal_for(graph_sandbox.base_url)
    user = graph_sandbox.users[1].mail
    account = linked_account(t, sign_in(app, user), user)
    provider = MsalTokenProvider(app, t.tokens, t.accounts)
    before = t.tokens.read(account.account_id)
    assert before is not None
    token = provider.access_token(account.account_id)
    assert me(graph_sandbox.base_url, token).json()["mail"].lower() == user.lower()
    # No refresh needed: nothing was written (serialised only when the state changed).
    assert t.tokens.read(account.account_id).etag == before.etag  # type: ignore[union-attr]
    assert provider.access_token(account.account_id) == token  # memoised
    refreshed = provider.access_token(account.account_id, force_refresh=True)
    assert refreshed != token
    assert me(graph_sandbox.base_url, refreshed).status_code == 200
    assert t.tokens.read(account.account_id).etag != before.etag  # type: ignore[union-attr]


class RacingTokenStore:
    """Wraps the token store so N workers all read the row before any of them refreshes."""

    def __init__(self, inner: Any, barrier: threading.Barrier) -> None:
        self._inner = inner
        self._barrier = barrier
        self._raced = threading.local()

    def read(self, account_id: str, kind: str = "msal") -> StoredCredential | None:
        stored = self._inner.read(account_id, kind)
        if not getattr(self._raced, "done", False):
            self._raced.done = True
            self._barrier.wait(timeout=30)
        return stored

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return getattr(self._inner, name)  # type: ignore[no-any-return]


def race_two_refreshes(app: MsalApp, t: LinkingTables, account_id: str) -> tuple[list[str], list[BaseException]]:
    """Two workers (separate providers = separate processes) force a refresh at the same moment."""
    barrier = threading.Barrier(2)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        provider = MsalTokenProvider(app, RacingTokenStore(t.tokens, barrier), t.accounts)  # type: ignore[arg-type]
        try:
            tokens.append(provider.access_token(account_id, force_refresh=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tokens, errors


@pytest.mark.parametrize("single_use", [False, True], ids=["entra-rotation", "single-use-refresh-tokens"])
def test_concurrent_refreshes_lose_no_refresh_token(sandbox_factory: Any, t: LinkingTables, single_use: bool) -> None:
    sandbox = sandbox_factory(single_use_refresh_tokens=single_use)
    app = msal_for(sandbox.base_url)
    user = sandbox.users[0].mail
    account = linked_account(t, sign_in(app, user), user)
    for _round in range(3):
        tokens, errors = race_two_refreshes(app, t, account.account_id)
        assert errors == [] and len(tokens) == 2
        for token in tokens:
            assert me(sandbox.base_url, token).status_code == 200
        assert t.accounts.get(account.account_id).status == AccountStatus.SYNCING  # type: ignore[union-attr]
    # What is stored still refreshes: the newest refresh token was never overwritten by an older one.
    fresh = MsalTokenProvider(app, t.tokens, t.accounts).access_token(account.account_id, force_refresh=True)
    assert me(sandbox.base_url, fresh).status_code == 200


def test_revoked_grant_marks_the_account_reauth_required(sandbox_factory: Any, t: LinkingTables) -> None:
    sandbox = sandbox_factory()
    app = msal_for(sandbox.base_url)
    user = sandbox.users[1].mail
    account = linked_account(t, sign_in(app, user), user)
    provider = MsalTokenProvider(app, t.tokens, t.accounts, sleep=lambda _s: None)
    token = provider.access_token(account.account_id)
    assert sandbox.admin("POST", f"users/{user}/revoke-grant", json={}).status_code == 200
    assert me(sandbox.base_url, token).status_code == 401
    with pytest.raises(ReauthRequired):
        provider.access_token(account.account_id, force_refresh=True)
    stored = t.accounts.get(account.account_id)
    assert stored is not None and stored.status == AccountStatus.REAUTH_REQUIRED
    assert stored.error and "Link it again" in stored.error
    # Still refused on the next call (no memoised token survives), and nothing loops.
    with pytest.raises(ReauthRequired):
        provider.access_token(account.account_id)


def test_no_stored_tokens_is_reauth_required(graph_sandbox: Any, t: LinkingTables) -> None:
    provider = MsalTokenProvider(msal_for(graph_sandbox.base_url), t.tokens, t.accounts)
    with pytest.raises(ReauthRequired):
        provider.access_token(uuid.uuid4().hex)
