"""LinkingService with a credentials provider (how IMAP will plug in), in process against Azurite.

The Outlook (redirect) path is tested end to end over HTTP in
test_linking_http.py; this covers the other shape of ``AccountLinker``: a
provider that verifies credentials inside ``begin`` and links at once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from devhost.services.process import free_port
from mailsync.errors import Conflict, DependencyUnavailable, InputError, ProviderError, RateLimited
from mailsync.jobs import JobKind, decode_job
from mailsync.linking.access import AccountAccess
from mailsync.linking.limits import LinkingLimits
from mailsync.linking.return_urls import ReturnUrlPolicy, with_params
from mailsync.linking.service import Caller, LinkedIdentity, LinkingService, LinkRedirect
from mailsync.models import AccountStatus, Provider
from mailsync.settings import Settings
from mailsync.storage import connection
from mailsync.storage.accounts import TableAccountRepository
from mailsync.storage.auth_flows import TableAuthFlowStore
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.rate_limits import TableRateLimiter
from tests.linking.tables import LinkingTables, linking_tables, table_client

USERS = {"ann@imap.test": "pw-ann-secret", "bob@imap.test": "pw-bob-secret",
         "victim@outlook.test": "pw-squatter"}


class PasswordLinker:
    """A credentials provider: checks the password against its user list, links at once."""

    provider = Provider.IMAP
    credential_kind = "imap"
    verifies_on_begin = True

    def begin(self, account_id: str, request: Mapping[str, Any], *,
              login_hint: str | None) -> LinkRedirect | LinkedIdentity:
        username, password = request.get("username"), request.get("password")
        host = request.get("host", "imap.test")
        if not isinstance(username, str) or USERS.get(username) != password:
            raise InputError("the server refused this username and password", code="login_failed")
        return LinkedIdentity(address=username, display_name=username.split("@")[0].title(),
                              provider_user_id=f"imap:{host}:993:{username}",
                              credential=orjson.dumps({"password": password}).decode(), credential_kind="imap")

    def complete(self, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        raise InputError("this provider has no sign-in redirect")


class VerifiedSignIn:
    """A redirect provider whose identity platform vouches for the address (Outlook's shape).

    The edge we cannot reach in process is the identity platform: here the
    callback's ``code`` names the person who signed in.
    """

    provider = Provider.OUTLOOK
    credential_kind = "msal"
    verifies_on_begin = False

    def begin(self, account_id: str, request: Mapping[str, Any], *, login_hint: str | None) -> LinkRedirect:
        state = uuid.uuid4().hex
        return LinkRedirect(authorize_url=f"https://login.test/authorize?state={state}", state=state,
                            flow={"state": state})

    def complete(self, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        assert params["state"] == flow["state"]
        if "error" in params:   # what the platform sends when the person cancels
            raise ProviderError("The sign-in was cancelled.", code=params["error"])
        address = params["code"]
        return LinkedIdentity(address=address, display_name="Verified", provider_user_id=f"graph:{address}",
                              credential="{}", credential_kind="msal")


def service(t: LinkingTables, settings: Settings, queue: AzureJobQueue | None = None, *,
            oauth: bool = False, limits: LinkingLimits | None = None,
            clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> LinkingService:
    linkers: dict[Provider, Any] = {Provider.IMAP: PasswordLinker()}
    if oauth:
        linkers[Provider.OUTLOOK] = VerifiedSignIn()
    return LinkingService(
        accounts=t.accounts, tokens=t.tokens, flows=t.flows, access=AccountAccess(t.accounts),
        jobs=queue or AzureJobQueue(settings),
        return_urls=ReturnUrlPolicy.from_base(settings.return_url_allowlist, settings.public_base_url),
        linkers=linkers, limits=limits, clock=clock)


def limits(settings: Settings, **values: int) -> LinkingLimits:
    """The production rules with these settings, counted in the test's own limits table."""
    configured = replace(settings, **values)  # type: ignore[arg-type]
    return LinkingLimits.from_settings(configured, TableRateLimiter(table_client(settings, "limits")))


def state_of(started: Any) -> str:
    return str(started.authorize_url).rsplit("=", 1)[1]


@pytest.fixture
def t(storage_settings: Settings) -> LinkingTables:
    return linking_tables(storage_settings)


def account_rows(t: LinkingTables) -> list[Any]:
    return list(t.accounts_table.query_entities("RowKey eq 'account'"))


def test_credentials_provider_links_at_once(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings)
    result = linking.start({"provider": "imap", "username": "ann@imap.test", "password": "pw-ann-secret"})
    assert result.created and result.authorize_url is None and result.access_token
    assert result.status == AccountStatus.SYNCING
    view = linking.get(result.account_id, result.access_token)
    assert view["status"] == "syncing" and view["address"] == "ann@imap.test" and view["provider"] == "imap"
    stored = t.tokens.read(result.account_id, "imap")
    assert stored is not None and orjson.loads(stored.plaintext) == {"password": "pw-ann-secret"}
    raw = t.accounts_table.get_entity(result.account_id, "cred-imap")
    assert b"pw-ann-secret" not in bytes(raw["blob"])
    client = connection.queue_client(storage_settings, storage_settings.sync_queue_name)
    jobs = [decode_job(m.content) for m in client.peek_messages(max_messages=10)]
    assert [(j.kind, j.account_id, j.reason) for j in jobs] == [
        (JobKind.SYNC_FOLDERS.value, result.account_id, "initial")]


def test_wrong_credentials_leave_nothing_behind(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings)
    with pytest.raises(InputError) as info:
        linking.start({"provider": "imap", "username": "ann@imap.test", "password": "wrong"})
    assert info.value.http_status == 400 and "wrong" not in info.value.message
    assert account_rows(t) == []


def test_an_address_linked_elsewhere_is_a_409_and_nothing_is_created(t: LinkingTables,
                                                                     storage_settings: Settings) -> None:
    linking = service(t, storage_settings)
    first = linking.start({"provider": "imap", "username": "bob@imap.test", "password": "pw-bob-secret"})
    with pytest.raises(Conflict) as info:
        linking.start({"provider": "imap", "username": "bob@imap.test", "password": "pw-bob-secret"})
    assert info.value.http_status == 409 and info.value.code == "address_in_use"
    assert [row["PartitionKey"] for row in account_rows(t)] == [first.account_id]
    # Unlinking frees the address.
    assert first.access_token
    linking.unlink(first.account_id, first.access_token)
    assert account_rows(t) == []
    again = linking.start({"provider": "imap", "username": "bob@imap.test", "password": "pw-bob-secret"})
    assert again.status == AccountStatus.SYNCING


def test_queue_down_marks_the_account_error_not_syncing(t: LinkingTables, storage_settings: Settings) -> None:
    assert storage_settings.storage_connection_string
    broken = re.sub(r"QueueEndpoint=http://127\.0\.0\.1:\d+/", f"QueueEndpoint=http://127.0.0.1:{free_port()}/",
                    storage_settings.storage_connection_string)
    settings = Settings.from_env({"AzureWebJobsStorage": broken, "TABLE_PREFIX": storage_settings.table_prefix})
    queue = AzureJobQueue(settings, client=connection.queue_client(
        settings, settings.sync_queue_name, retry_total=0))
    linking = service(t, settings, queue)
    with pytest.raises(DependencyUnavailable):
        linking.start({"provider": "imap", "username": "ann@imap.test", "password": "pw-ann-secret"})
    [row] = account_rows(t)
    assert row["status"] == "error" and "could not be started" in row["error"]


def test_providers_without_a_linker_are_refused(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings)
    with pytest.raises(InputError) as info:
        linking.start({"provider": "outlook"})
    assert info.value.code == "unsupported_provider"
    with pytest.raises(InputError):
        linking.start({"provider": "imap", "username": "ann@imap.test", "password": "pw-ann-secret",
                       "return_url": "https://evil.example.com/"})
    assert account_rows(t) == []


def test_an_imap_login_never_reserves_an_address_a_sign_in_verifies(t: LinkingTables,
                                                                   storage_settings: Settings) -> None:
    """Address squatting (issue 16): an IMAP user name is not proof of owning the address."""
    linking = service(t, storage_settings, oauth=True)
    squat = linking.start({"provider": "imap", "username": "victim@outlook.test", "password": "pw-squatter"})
    assert squat.status == AccountStatus.SYNCING
    started = linking.start({"provider": "outlook"})
    assert started.authorize_url and started.browser_nonce
    state = started.authorize_url.rsplit("=", 1)[1]
    location = linking.complete({"state": state, "code": "victim@outlook.test"}, Caller(started.browser_nonce))
    assert location == with_params(storage_settings.public_base_url + "/data.html",
                                   {"account_id": started.account_id})
    assert started.access_token
    view = linking.get(started.account_id, started.access_token)
    assert view["status"] == "syncing" and view["address"] == "victim@outlook.test"
    assert t.accounts.address_owner("victim@outlook.test") == started.account_id


def test_imap_accounts_are_keyed_by_host_port_and_user(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings)
    body = {"provider": "imap", "username": "ann@imap.test", "password": "pw-ann-secret"}
    one = linking.start({**body, "host": "one.imap.test"})
    two = linking.start({**body, "host": "two.imap.test"})   # the same user name on another server: its own mailbox
    assert one.status == two.status == AccountStatus.SYNCING
    with pytest.raises(Conflict) as info:
        linking.start({**body, "host": "one.imap.test"})
    assert info.value.code == "address_in_use"


ANN = {"provider": "imap", "username": "ann@imap.test", "password": "pw-ann-secret"}


def test_new_accounts_are_limited_per_client(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings, oauth=True, limits=limits(storage_settings, rate_limit_new_accounts=2))
    me, other = Caller(client="203.0.113.7"), Caller(client="198.51.100.4")
    for _ in range(2):
        linking.start({"provider": "outlook"}, caller=me)
    before = account_rows(t)
    with pytest.raises(RateLimited) as info:
        linking.start({"provider": "outlook"}, caller=me)
    assert info.value.http_status == 429 and info.value.code == "too_many_accounts"
    assert 0 < info.value.retry_after_s <= 1800
    assert account_rows(t) == before   # nothing written
    linking.start({"provider": "outlook"}, caller=other)


def test_imap_attempts_are_limited_per_client_new_or_relink(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings, limits=limits(storage_settings, rate_limit_imap_attempts=3))
    me = Caller(client="203.0.113.8")
    for _ in range(2):
        with pytest.raises(InputError):
            linking.start({**ANN, "password": "wrong"}, caller=me)
    linked = linking.start(ANN, caller=me)
    assert linked.access_token
    with pytest.raises(RateLimited) as info:   # a re-link logs in too
        linking.start({**ANN, "account_id": linked.account_id}, linked.access_token, caller=me)
    assert info.value.code == "too_many_imap_attempts"
    with pytest.raises(RateLimited):
        linking.start({**ANN, "host": "other.imap.test"}, caller=me)
    assert [row["PartitionKey"] for row in account_rows(t)] == [linked.account_id]


def test_linked_accounts_per_client_per_day(t: LinkingTables, storage_settings: Settings) -> None:
    linking = service(t, storage_settings, oauth=True,
                      limits=limits(storage_settings, linked_accounts_per_client_per_day=2))
    me = Caller(client="203.0.113.9")
    linking.start({**ANN, "host": "one.imap.test"}, caller=me)              # link 1 (at once)
    started = linking.start({"provider": "outlook"}, caller=me)
    also = linking.start({"provider": "outlook"}, caller=me)               # started while one link is left
    assert started.browser_nonce and also.browser_nonce
    done = linking.complete({"state": state_of(started), "code": "dee@outlook.test"},
                            Caller(started.browser_nonce, me.client))   # link 2 (at the callback)
    assert "error" not in done
    with pytest.raises(RateLimited) as info:                                # no third account today
        linking.start({**ANN, "host": "two.imap.test"}, caller=me)
    assert info.value.code == "daily_link_limit" and info.value.retry_after_s > 3600
    refused = linking.complete({"state": state_of(also), "code": "eve@outlook.test"},
                               Caller(also.browser_nonce, me.client))
    assert "error=daily_link_limit" in refused
    assert also.access_token and linking.get(also.account_id, also.access_token)["address"] is None
    assert t.accounts.address_owner("eve@outlook.test") is None
    # A re-link is not a new mailbox: it is not counted.
    assert started.access_token
    relink = linking.start({"provider": "outlook", "account_id": started.account_id}, started.access_token,
                           caller=me)
    again = linking.complete({"state": state_of(relink), "code": "dee@outlook.test"},
                             Caller(relink.browser_nonce, me.client))
    assert "error" not in again
    linking.start({**ANN, "host": "three.imap.test"}, caller=Caller(client="198.51.100.9"))   # another client


def test_clean_up_deletes_never_linked_accounts_after_an_hour(t: LinkingTables, storage_settings: Settings) -> None:
    now = [datetime.now(UTC)]
    linking = service(t, storage_settings, oauth=True, clock=lambda: now[0])
    abandoned = linking.start({"provider": "outlook"})                   # never came back
    cancelled = linking.start({"provider": "outlook"})
    linking.complete({"state": state_of(cancelled), "error": "access_denied"}, Caller(cancelled.browser_nonce))
    linked = linking.start({"provider": "outlook"})
    linking.complete({"state": state_of(linked), "code": "fay@outlook.test"}, Caller(linked.browser_nonce))
    now[0] += timedelta(minutes=30)
    recent = linking.start({"provider": "outlook"})
    report = linking.clean_up(timedelta(hours=1))
    assert report.stale_accounts == 0 and report.expired_sign_ins == 1   # abandoned's flow expired (10 min)
    now[0] += timedelta(minutes=31)
    report = linking.clean_up(timedelta(hours=1))
    assert report.stale_accounts == 2 and report.expired_sign_ins == 1   # recent's flow expired too
    left = {row["PartitionKey"] for row in account_rows(t)}
    assert left == {linked.account_id, recent.account_id}
    assert abandoned.access_token and cancelled.access_token
    for gone in (abandoned, cancelled):
        with pytest.raises(Exception) as info:
            linking.get(gone.account_id, gone.access_token)
        assert getattr(info.value, "http_status", None) == 401
    assert list(t.flows_table.list_entities()) == []
    assert t.accounts.address_owner("fay@outlook.test") == linked.account_id


def test_clean_up_keeps_an_account_restarted_meanwhile(t: LinkingTables, storage_settings: Settings) -> None:
    now = [datetime.now(UTC)]
    linking = service(t, storage_settings, oauth=True, clock=lambda: now[0])
    started = linking.start({"provider": "outlook"})
    [stale] = [a for a in t.accounts.iter_accounts() if a.account_id == started.account_id]
    t.accounts.save(replace(stale, return_url=stale.return_url))   # touched after the scan read it
    with pytest.raises(Conflict):
        t.accounts.delete(stale.account_id, etag=stale.etag)
    assert t.accounts.get(started.account_id) is not None


def _unreachable_tables(settings: Settings) -> Settings:
    """The same tables' names on a port nothing listens on."""
    assert settings.storage_connection_string
    broken = re.sub(r"TableEndpoint=http://127\.0\.0\.1:\d+/", f"TableEndpoint=http://127.0.0.1:{free_port()}/",
                    settings.storage_connection_string)
    return Settings.from_env({"AzureWebJobsStorage": broken, "TABLE_PREFIX": settings.table_prefix})


def test_a_sign_in_whose_account_could_not_be_saved_is_discarded(t: LinkingTables, storage_settings: Settings) -> None:
    """The account and its pending sign-in are written at once; when only the sign-in made it, it goes."""
    broken = connection.table_client(_unreachable_tables(storage_settings), "accounts", retry_total=0)
    tables = replace(t, accounts=TableAccountRepository(broken, t.tokens))
    with pytest.raises(DependencyUnavailable):
        service(tables, storage_settings, oauth=True).start({"provider": "outlook"})
    assert list(t.flows_table.list_entities()) == [] and account_rows(t) == []


def test_an_account_whose_sign_in_could_not_be_saved_is_removed(t: LinkingTables, storage_settings: Settings) -> None:
    broken = connection.table_client(_unreachable_tables(storage_settings), "authflows", retry_total=0)
    tables = replace(t, flows=TableAuthFlowStore(broken, t.cipher))
    with pytest.raises(DependencyUnavailable):
        service(tables, storage_settings, oauth=True).start({"provider": "outlook"})
    assert account_rows(t) == []
