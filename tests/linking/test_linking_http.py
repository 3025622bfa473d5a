"""Account linking end to end: the devhost over HTTP, the Graph sandbox's sign-in, Azurite, the store.

One devhost (only the linking functions, so the initial-sync job stays on
the queue to be peeked) and one sandbox of our own per module: revoking a
grant must not disturb other modules' sandbox users. Each test signs in a
different sandbox user unless it is about the same address.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import azure.functions as func
import orjson
import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError

from devhost.services.process import free_port
from functions._shared.runtime import runtime
from functions.oauth_callback import bp as oauth_callback_blueprint
from functions.oauth_start import bp as oauth_start_blueprint
from graph_sandbox.config import SandboxConfig
from mailsync.auth.msal_app import MsalApp
from mailsync.auth.token_provider import MsalTokenProvider
from mailsync.jobs import THEN_SYNC, JobKind, decode_job
from mailsync.security.crypto import Sealed, TokenCipher
from mailsync.settings import Settings
from mailsync.storage import connection
from mailsync.store.engines import connect
from mailsync.store.search_store import SearchStore, StoreOptions
from tests.fixtures.devhost import (
    DevhostProcess,
    app_settings,
    busy_function,
    start_devhost,
    start_devhost_in_process,
)
from tests.fixtures.graph_sandbox import SandboxTestServer, start_sandbox
from tests.linking.browser import query, submit_sign_in
from tests.linking.tables import LinkingTables, linking_tables

KEY = bytes(range(7, 39))
KEY_ENTRY = f"e2e1:{base64.b64encode(KEY).decode()}"
LINKING_FUNCTIONS = ["oauth_start", "oauth_callback", "account_get", "account_delete"]


@dataclass
class Stack:
    host: DevhostProcess
    sandbox: SandboxTestServer
    env: dict[str, str]
    settings: Settings
    tables: LinkingTables
    store: SearchStore
    # The page's browser: it keeps the sign-in cookie from POST /api/accounts for the callback.
    browser: requests.Session

    @property
    def api(self) -> str:
        return f"{self.host.base_url}/api"

    def user(self, index: int) -> str:
        return self.sandbox.users[index].mail

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.browser.post(f"{self.api}/accounts", json={"provider": "outlook", **body}, timeout=30)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def get(self, account_id: str, token: str | None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return requests.get(f"{self.api}/accounts/{account_id}", headers=headers, timeout=30)

    def callback(self, url: str) -> requests.Response:
        assert url.startswith(f"{self.api}/oauth/callback?"), url
        return self.browser.get(url, allow_redirects=False, timeout=30)

    def link(self, username: str, **body: Any) -> tuple[dict[str, Any], requests.Response]:
        """Create an account and sign ``username`` in: (POST answer, callback answer)."""
        created = self.create(**body)
        return created, self.callback(submit_sign_in(created["authorize_url"], username))

    def jobs(self) -> list[Any]:
        """The queued sync jobs (none yet if nothing was ever enqueued: the queue is created on first use)."""
        client = connection.queue_client(self.settings, self.settings.sync_queue_name)
        try:
            return [decode_job(m.content) for m in client.peek_messages(max_messages=32)]
        except ResourceNotFoundError:
            return []


@pytest.fixture(scope="module")
def stack(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sandbox = start_sandbox(SandboxConfig(seed=7, users=16, messages_per_user=3))
    port = free_port()
    env = app_settings(name="link", storage=azurite.connection_string, search_store_url=search_store_url, port=port,
                       local_dir=tmp_path_factory.mktemp("local"), key_entry=KEY_ENTRY,
                       GRAPH_SANDBOX_URL=sandbox.base_url)
    host = start_devhost(env, port=port, functions=LINKING_FUNCTIONS, log_dir=tmp_path_factory.mktemp("devhost"))
    settings = Settings.from_env(env)
    store = SearchStore(connect(search_store_url), StoreOptions(prefix=settings.index_prefix))
    try:
        yield Stack(host, sandbox, env, settings, linking_tables(settings, TokenCipher([("e2e1", KEY)])), store,
                    requests.Session())
    finally:
        host.stop(timeout_s=15)
        store.close()
        sandbox.stop()


def test_full_flow_create_sign_in_callback_syncing(stack: Stack) -> None:
    user = stack.user(0)
    created = stack.create()
    account_id, token = created["account_id"], created["access_token"]
    assert created["status"] == "linking"
    assert created["authorize_url"].startswith(f"{stack.sandbox.base_url}/common/oauth2/v2.0/authorize?")
    auth = query(created["authorize_url"])
    assert auth["redirect_uri"] == f"{stack.api}/oauth/callback"
    assert auth["code_challenge_method"] == "S256" and auth["state"] and auth["nonce"]
    assert {"Mail.ReadWrite", "User.Read", "offline_access"} <= set(auth["scope"].split())
    assert stack.get(account_id, token).json()["status"] == "linking"
    # The access token is stored only as a hash.
    row = stack.tables.accounts_table.get_entity(account_id, "account")
    assert row["access_token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(dict(row))

    callback_url = submit_sign_in(created["authorize_url"], user)
    response = stack.callback(callback_url)
    assert response.status_code == 302
    assert response.headers["Location"] == f"{stack.host.base_url}/data.html?account_id={account_id}"

    view = stack.get(account_id, token).json()
    assert view["status"] == "syncing" and view["error"] is None
    assert view["address"].lower() == user.lower() and view["display_name"]
    assert view["provider"] == "outlook" and view["account_id"] == account_id
    assert "access_token_hash" not in view
    # The sync engine's summary rides along (no worker runs here, so nothing has started yet).
    assert view["sync"]["phase"] == "pending" and view["sync"]["folders_total"] == 0

    # The token cache: encrypted at rest, under the configured key, a real MSAL cache inside.
    cred = stack.tables.accounts_table.get_entity(account_id, "cred-msal")
    assert cred["key_id"] == "e2e1"
    cache = orjson.loads(TokenCipher([("e2e1", KEY)]).open(Sealed("e2e1", bytes(cred["blob"])),
                                                           context=f"msal:{account_id}"))
    refresh_tokens = [rt["secret"] for rt in cache["RefreshToken"].values()]
    access_tokens = [at["secret"] for at in cache["AccessToken"].values()]
    assert refresh_tokens and access_tokens
    for secret in refresh_tokens + access_tokens:
        assert secret.encode() not in bytes(cred["blob"])

    jobs = [j for j in stack.jobs() if j.account_id == account_id]
    # One job, the subscriptions, which then start the initial sync (they must exist before it reads),
    # then one WAKE through the callback's queue output binding (the host polls its queue at once:
    # mailsync.jobs.WakingJobQueue).
    assert [(j.kind, j.reason, j.attrs) for j in jobs] == [
        (JobKind.SUBSCRIPTION.value, "initial", {THEN_SYNC: "1"}),
        (JobKind.WAKE.value, f"wake for {jobs[0].job_id}", {})]
    mailbox = stack.store.get_mailbox(account_id)
    assert mailbox is not None and mailbox.address.lower() == user.lower()

    # The stored cache works for workers: a Graph token for the right mailbox.
    provider = MsalTokenProvider(MsalApp.from_settings(stack.settings), stack.tables.tokens, stack.tables.accounts)
    me = requests.get(f"{stack.sandbox.base_url}/v1.0/me", timeout=10,
                      headers={"Authorization": f"Bearer {provider.access_token(account_id)}"})
    assert me.json()["mail"].lower() == user.lower()


def test_a_forwarded_sign_in_link_links_nothing_and_the_victim_can_still_link(stack: Stack) -> None:
    """Login CSRF (issue 16): an attacker starts a sign-in, keeps the token and forwards the link.

    The victim signs in at the genuine sign-in page, in a browser that
    shares nothing with the attacker's: the callback must refuse, link
    nothing, and leave the victim free to link their own mailbox.
    """
    victim_user = stack.user(13)
    attacker = requests.Session()
    started = attacker.post(f"{stack.api}/accounts", json={"provider": "outlook"}, timeout=30)
    assert started.status_code == 201, started.text
    cookie = started.headers["Set-Cookie"]
    assert cookie.startswith("mailsync-signin=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Path=/" in cookie and "Secure" not in cookie  # served over plain http here
    forwarded = started.json()
    callback_url = submit_sign_in(forwarded["authorize_url"], victim_user)

    victim = requests.Session()
    refused = victim.get(callback_url, allow_redirects=False, timeout=30)   # no sign-in cookie at all
    assert refused.status_code == 403, refused.text
    assert refused.headers["Content-Type"].startswith("text/html") and "Location" not in refused.headers
    assert "different browser" in refused.text and "Nothing was linked" in refused.text
    assert "default-src 'none'" in refused.headers["Content-Security-Policy"]
    own = victim.post(f"{stack.api}/accounts", json={"provider": "outlook"}, timeout=30).json()
    assert "mailsync-signin" in victim.cookies   # now a cookie, but this browser's own, not the attacker's
    again = victim.get(callback_url, allow_redirects=False, timeout=30)
    assert again.status_code == 403

    view = stack.get(forwarded["account_id"], forwarded["access_token"]).json()
    assert view["status"] == "linking" and view["address"] is None   # the attacker got nothing
    assert stack.tables.tokens.read(forwarded["account_id"]) is None
    assert stack.tables.accounts.address_owner(victim_user) is None
    assert not [j for j in stack.jobs() if j.account_id == forwarded["account_id"]]

    done = victim.get(submit_sign_in(own["authorize_url"], victim_user), allow_redirects=False, timeout=30)
    assert done.status_code == 302 and "error" not in query(done.headers["Location"])
    mine = stack.get(own["account_id"], own["access_token"]).json()
    assert mine["status"] == "syncing" and mine["address"].lower() == victim_user.lower()


def test_two_sign_ins_from_one_browser_both_complete(stack: Stack) -> None:
    """The cookie's nonce is kept across starts: a second tab does not break the first tab's sign-in."""
    first, second = stack.create(), stack.create()
    assert first["authorize_url"] != second["authorize_url"]
    first_url, second_url = (submit_sign_in(c["authorize_url"], stack.user(14)) for c in (first, second))
    one = stack.callback(first_url)
    assert one.status_code == 302 and "error" not in query(one.headers["Location"])
    two = stack.callback(second_url)
    assert two.status_code == 302
    # Both reached the identity platform; the second mailbox is the same person: the 409 rule, not a refusal.
    assert query(two.headers["Location"])["error"] == "address_in_use"


def test_return_url_is_honoured_and_checked(stack: Stack) -> None:
    wanted = f"{stack.host.base_url}/index.html?view=new"
    created, response = stack.link(stack.user(1), return_url=wanted)
    assert response.headers["Location"] == f"{wanted}&account_id={created['account_id']}"

    before = list(stack.tables.accounts_table.list_entities())
    for bad in ("https://evil.example.com/", f"{stack.host.base_url}@evil.example.com/", "javascript:alert(1)"):
        answer = requests.post(f"{stack.api}/accounts", json={"provider": "outlook", "return_url": bad}, timeout=30)
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_return_url"
    assert len(list(stack.tables.accounts_table.list_entities())) == len(before)  # nothing created


def test_bad_create_requests(stack: Stack) -> None:
    cases = [({"provider": "gmail"}, 400), ({}, 400), ({"provider": "outlook", "extra": 1}, 400),
             ({"provider": "imap"}, 400)]
    for body, status in cases:
        answer = requests.post(f"{stack.api}/accounts", json=body, timeout=30)
        assert answer.status_code == status, (body, answer.text)
    assert requests.post(f"{stack.api}/accounts", data=b"{not json", timeout=30,
                         headers={"Content-Type": "application/json"}).status_code == 400
    assert requests.post(f"{stack.api}/accounts", data=b"[1]", timeout=30,
                         headers={"Content-Type": "application/json"}).status_code == 400


def test_bearer_rules(stack: Stack) -> None:
    one = stack.create()
    two = stack.create()
    assert stack.get(one["account_id"], None).status_code == 401
    assert stack.get(one["account_id"], None).headers["WWW-Authenticate"].startswith("Bearer")
    assert stack.get(one["account_id"], "garbage").status_code == 401
    assert stack.get(one["account_id"], one["access_token"] + "x").status_code == 401
    forged = f"{one['account_id']}.{two['access_token'].split('.', 1)[1]}"
    assert stack.get(one["account_id"], forged).status_code == 401
    # Another account's valid token: 404, exactly like an id that does not exist.
    other = stack.get(one["account_id"], two["access_token"])
    missing = stack.get("0" * 32, two["access_token"])
    assert other.status_code == missing.status_code == 404
    assert other.json() == missing.json()
    gone = requests.delete(f"{stack.api}/accounts/{one['account_id']}", timeout=30,
                           headers={"Authorization": f"Bearer {two['access_token']}"})
    assert gone.status_code == 404
    assert stack.get(one["account_id"], one["access_token"]).status_code == 200  # untouched


def test_unknown_and_reused_state(stack: Stack) -> None:
    for params in ("state=nope&code=abc", "code=abc", "state=&code=abc", "state=" + "x" * 2000):
        answer = requests.get(f"{stack.api}/oauth/callback?{params}", allow_redirects=False, timeout=30)
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_state"
    _, first = stack.link(stack.user(2))
    assert first.status_code == 302 and "error" not in query(first.headers["Location"])
    # The very same callback again (browser back button, an attacker replaying the URL).
    callback = first.request.url
    assert callback is not None
    replay = stack.browser.get(callback, allow_redirects=False, timeout=30)
    assert replay.status_code == 400 and replay.json()["error"]["code"] == "invalid_state"


def test_expired_state(stack: Stack) -> None:
    created = stack.create()
    callback = submit_sign_in(created["authorize_url"], stack.user(3))
    state = query(callback)["state"]
    key = hashlib.sha256(state.encode()).hexdigest()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat(timespec="microseconds")
    stack.tables.flows_table.update_entity({"PartitionKey": key, "RowKey": "flow", "expires_at": past})
    answer = stack.callback(callback)
    assert answer.status_code == 302
    params = query(answer.headers["Location"])
    assert params["error"] == "login_expired" and params["account_id"] == created["account_id"]
    view = stack.get(created["account_id"], created["access_token"]).json()
    assert view["status"] == "error" and "too long" in view["error"]
    assert stack.tables.tokens.read(created["account_id"]) is None
    assert stack.callback(callback).status_code == 400  # consumed


def test_code_replay_with_a_fresh_state(stack: Stack) -> None:
    _, first = stack.link(stack.user(4))
    used_code = query(first.request.url or "")["code"]
    attacker = stack.create()
    state = query(attacker["authorize_url"])["state"]
    answer = stack.callback(f"{stack.api}/oauth/callback?code={used_code}&state={state}")
    assert answer.status_code == 302
    params = query(answer.headers["Location"])
    assert params["error"] == "invalid_grant"
    assert params["error_description"]
    view = stack.get(attacker["account_id"], attacker["access_token"]).json()
    assert view["status"] == "error" and view["address"] is None
    assert stack.tables.tokens.read(attacker["account_id"]) is None


def test_access_denied_then_retry(stack: Stack) -> None:
    created = stack.create()
    account_id, token = created["account_id"], created["access_token"]
    answer = stack.callback(submit_sign_in(created["authorize_url"], None, cancel=True))
    params = query(answer.headers["Location"])
    assert params["error"] == "access_denied" and params["account_id"] == account_id
    assert "cancelled" in params["error_description"]
    view = stack.get(account_id, token).json()
    assert view["status"] == "error" and "cancelled" in view["error"]
    assert not [j for j in stack.jobs() if j.account_id == account_id]

    # Retry: a new sign-in for the same account, with its bearer token.
    retry = stack.browser.post(f"{stack.api}/accounts", json={"provider": "outlook", "account_id": account_id},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert retry.status_code == 200, retry.text
    assert "access_token" not in retry.json() and retry.json()["status"] == "linking"
    done = stack.callback(submit_sign_in(retry.json()["authorize_url"], stack.user(5)))
    assert "error" not in query(done.headers["Location"])
    view = stack.get(account_id, token).json()
    assert view["status"] == "syncing" and view["error"] is None
    # Retrying someone else's account is refused.
    other = stack.create()
    refused = stack.browser.post(f"{stack.api}/accounts", json={"provider": "outlook", "account_id": account_id},
                            headers={"Authorization": f"Bearer {other['access_token']}"}, timeout=30)
    assert refused.status_code == 404


def test_address_linked_elsewhere_and_relink_refreshes(stack: Stack) -> None:
    user = stack.user(6)
    first, _ = stack.link(user)
    etag = stack.tables.tokens.read(first["account_id"]).etag  # type: ignore[union-attr]
    second, answer = stack.link(user)
    params = query(answer.headers["Location"])
    assert params["error"] == "address_in_use" and params["account_id"] == second["account_id"]
    view = stack.get(second["account_id"], second["access_token"]).json()
    assert view["status"] == "error" and view["address"] is None
    assert stack.tables.tokens.read(second["account_id"]) is None

    # Re-linking the same address to the same account refreshes its tokens.
    retry = stack.browser.post(f"{stack.api}/accounts", json={"provider": "outlook", "account_id": first["account_id"]},
                          headers={"Authorization": f"Bearer {first['access_token']}"}, timeout=30)
    assert query(retry.json()["authorize_url"]).get("login_hint", "").lower() == user.lower()
    done = stack.callback(submit_sign_in(retry.json()["authorize_url"], user))
    assert "error" not in query(done.headers["Location"])
    assert stack.tables.tokens.read(first["account_id"]).etag != etag  # type: ignore[union-attr]
    assert stack.get(first["account_id"], first["access_token"]).json()["status"] == "syncing"
    relinks = [j for j in stack.jobs() if j.account_id == first["account_id"] and j.reason == "relink"]
    assert relinks and relinks[0].kind == JobKind.SUBSCRIPTION.value and relinks[0].attrs == {THEN_SYNC: "1"}

    # ... but signing in as another mailbox on a linked account is refused, and changes nothing.
    retry = stack.browser.post(f"{stack.api}/accounts", json={"provider": "outlook", "account_id": first["account_id"]},
                          headers={"Authorization": f"Bearer {first['access_token']}"}, timeout=30)
    wrong = stack.callback(submit_sign_in(retry.json()["authorize_url"], stack.user(7)))
    assert query(wrong.headers["Location"])["error"] == "wrong_mailbox"
    view = stack.get(first["account_id"], first["access_token"]).json()
    assert view["address"].lower() == user.lower() and view["status"] == "syncing"


def test_callback_for_an_account_deleted_meanwhile(stack: Stack) -> None:
    created = stack.create()
    callback = submit_sign_in(created["authorize_url"], stack.user(8))
    deleted = requests.delete(f"{stack.api}/accounts/{created['account_id']}", timeout=30,
                              headers={"Authorization": f"Bearer {created['access_token']}"})
    assert deleted.status_code == 204
    answer = stack.callback(callback)
    assert answer.status_code == 302
    assert query(answer.headers["Location"])["error"] == "account_not_found"
    assert stack.tables.accounts.get(created["account_id"]) is None
    assert stack.tables.tokens.read(created["account_id"]) is None
    assert not [j for j in stack.jobs() if j.account_id == created["account_id"]]
    assert stack.tables.accounts.address_owner(stack.user(8)) is None


def test_unlink_deletes_tokens_documents_and_rows(stack: Stack) -> None:
    user = stack.user(9)
    created, _ = stack.link(user)
    account_id, token = created["account_id"], created["access_token"]
    assert stack.store.get_mailbox(account_id) is not None
    answer = requests.delete(f"{stack.api}/accounts/{account_id}", headers={"Authorization": f"Bearer {token}"},
                             timeout=30)
    assert answer.status_code == 204
    assert stack.get(account_id, token).status_code == 401  # the token died with the account
    assert list(stack.tables.accounts_table.query_entities("PartitionKey eq @pk", parameters={"pk": account_id})) == []
    assert stack.tables.accounts.address_owner(user) is None
    stack.store.refresh()
    assert stack.store.get_mailbox(account_id) is None
    # The address is free again.
    _, response = stack.link(user)
    assert "error" not in query(response.headers["Location"])


def test_reauth_required_after_the_sandbox_revokes_the_grant(stack: Stack) -> None:
    user = stack.user(10)
    created, _ = stack.link(user)
    account_id, token = created["account_id"], created["access_token"]
    revoke = stack.sandbox.admin("POST", f"users/{user}/revoke-grant", json={})
    assert revoke.status_code == 200
    # A worker asks for a token (as the sync engine does after Graph's 401).
    provider = MsalTokenProvider(MsalApp.from_settings(stack.settings), stack.tables.tokens, stack.tables.accounts,
                                 sleep=lambda _s: None)
    from mailsync.errors import ReauthRequired

    with pytest.raises(ReauthRequired):
        provider.access_token(account_id, force_refresh=True)
    view = stack.get(account_id, token).json()
    assert view["status"] == "reauth_required" and "Link it again" in view["error"]
    # Re-linking (signing in again restores consent) brings it back.
    retry = stack.browser.post(f"{stack.api}/accounts", json={"provider": "outlook", "account_id": account_id},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert retry.status_code == 200
    done = stack.callback(submit_sign_in(retry.json()["authorize_url"], user))
    assert "error" not in query(done.headers["Location"])
    assert stack.get(account_id, token).json()["status"] == "syncing"
    assert provider.access_token(account_id)


def test_no_token_code_or_secret_in_the_logs(stack: Stack) -> None:
    created, answer = stack.link(stack.user(11))
    callback = query(answer.request.url or "")
    cred = stack.tables.tokens.read(created["account_id"])
    assert cred is not None
    cache = orjson.loads(cred.plaintext)
    secrets = [created["access_token"], created["access_token"].split(".", 1)[1], callback["code"],
               query(created["authorize_url"])["code_challenge"], stack.settings.ms_client_secret]
    secrets += [entry["secret"] for kind in ("AccessToken", "RefreshToken", "IdToken")
                for entry in cache.get(kind, {}).values()]
    logs = stack.host.logs()
    assert "account linked" in logs  # the logs are there, and they are about this
    for secret in secrets:
        assert secret and secret not in logs
    # Nor do error answers echo them.
    bad = stack.browser.get(f"{stack.api}/oauth/callback?state={callback['state']}&code={callback['code']}",
                            allow_redirects=False, timeout=30)
    assert callback["code"] not in bad.text and callback["state"] not in bad.text


@pytest.fixture
def closed_port_env(stack: Stack) -> dict[str, str]:
    port = free_port()  # nothing listens there
    broken = re.sub(r"TableEndpoint=http://127\.0\.0\.1:\d+/", f"TableEndpoint=http://127.0.0.1:{port}/",
                    stack.env["AzureWebJobsStorage"])
    assert broken != stack.env["AzureWebJobsStorage"]
    return {**stack.env, "AzureWebJobsStorage": broken}


def test_tables_unavailable_is_503_with_retry_after(stack: Stack, closed_port_env: dict[str, str],
                                                   devhost_factory: Any) -> None:
    host = devhost_factory(closed_port_env, functions=LINKING_FUNCTIONS)
    api = f"{host.base_url}/api"
    answers = [
        requests.post(f"{api}/accounts", json={"provider": "outlook"}, timeout=60),
        requests.get(f"{api}/oauth/callback?state=abc&code=def", allow_redirects=False, timeout=60),
        requests.get(f"{api}/accounts/{'a' * 32}", headers={"Authorization": f"Bearer {'a' * 32}.x"}, timeout=60),
    ]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        assert answer.json()["error"]["code"] == "dependency_unavailable"


def test_queue_unavailable_leaves_no_half_linked_account(stack: Stack, devhost_factory: Any) -> None:
    """Tables up, queue down: the callback cannot start the sync, so the account must not claim to be syncing."""
    port = free_port()
    broken = re.sub(r"QueueEndpoint=http://127\.0\.0\.1:\d+/", f"QueueEndpoint=http://127.0.0.1:{port}/",
                    stack.env["AzureWebJobsStorage"])
    host_port = free_port()
    env = {**stack.env, "AzureWebJobsStorage": broken, "PUBLIC_BASE_URL": f"http://127.0.0.1:{host_port}"}
    host = devhost_factory(env, port=host_port, functions=LINKING_FUNCTIONS)
    browser = requests.Session()
    created = browser.post(f"{host.base_url}/api/accounts", json={"provider": "outlook"}, timeout=60).json()
    callback = submit_sign_in(created["authorize_url"], stack.user(12))
    assert urlsplit(callback).netloc == f"127.0.0.1:{host_port}"
    answer = browser.get(callback, allow_redirects=False, timeout=60)
    assert answer.status_code == 302
    params = query(answer.headers["Location"])
    assert params["error"] == "temporarily_unavailable"
    view = stack.get(created["account_id"], created["access_token"]).json()
    assert view["status"] == "error" and "could not be started" in view["error"]


def test_a_sign_in_completes_while_every_host_thread_is_busy(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sync jobs fill the host's shared thread pool while accounts are onboarded; the person signing in
    must not wait behind them (functions/oauth_callback: its own threads, as oauth_start's)."""
    busy = busy_function()
    entered, release = busy.entered, busy.release

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    for blueprint in (oauth_start_blueprint, oauth_callback_blueprint, busy.blueprint):
        app.register_functions(blueprint)
    port = free_port()
    env = {**stack.env, "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runtime.cache_clear()                 # the in-process host shares this process's runtime()
    host = start_devhost_in_process(app, {**env, "PYTHON_THREADPOOL_THREAD_COUNT": "1"}, port=port)
    browser = requests.Session()
    try:
        with ThreadPoolExecutor(max_workers=1) as client:
            blocked = client.submit(requests.get, f"{host.base_url}/api/busy", timeout=90)
            assert entered.wait(30)       # the host's only thread is now taken
            created = browser.post(f"{host.base_url}/api/accounts", json={"provider": "outlook"}, timeout=20)
            assert created.status_code == 201, created.text
            callback = submit_sign_in(created.json()["authorize_url"], stack.user(15))
            done = browser.get(callback, allow_redirects=False, timeout=20)
            assert done.status_code == 302 and "error" not in query(done.headers["Location"]), done.headers
            assert not blocked.done()     # all of that happened while the shared pool was still busy
            release.set()
            assert blocked.result().status_code == 200
        view = stack.get(created.json()["account_id"], created.json()["access_token"]).json()
        assert view["status"] == "syncing" and view["address"].lower() == stack.user(15).lower()
        assert JobKind.SUBSCRIPTION in [j.kind for j in stack.jobs() if j.account_id == created.json()["account_id"]]
    finally:
        release.set()
        host.stop(5)
        runtime.cache_clear()
