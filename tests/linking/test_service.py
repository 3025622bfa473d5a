"""LinkingService with a credentials provider (how IMAP will plug in), in process against Azurite.

The Outlook (redirect) path is tested end to end over HTTP in
test_linking_http.py; this covers the other shape of ``AccountLinker``: a
provider that verifies credentials inside ``begin`` and links at once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from devhost.services.process import free_port
from mailsync.errors import Conflict, DependencyUnavailable, InputError
from mailsync.jobs import JobKind, decode_job
from mailsync.linking.access import AccountAccess
from mailsync.linking.return_urls import ReturnUrlPolicy, with_params
from mailsync.linking.service import Caller, LinkedIdentity, LinkingService, LinkRedirect
from mailsync.models import Account, AccountStatus, Provider
from mailsync.settings import Settings
from mailsync.storage import connection
from mailsync.storage.job_queue import AzureJobQueue
from tests.linking.tables import LinkingTables, linking_tables

USERS = {"ann@imap.test": "pw-ann-secret", "bob@imap.test": "pw-bob-secret",
         "victim@outlook.test": "pw-squatter"}


class PasswordLinker:
    """A credentials provider: checks the password against its user list, links at once."""

    provider = Provider.IMAP
    credential_kind = "imap"

    def begin(self, account_id: str, request: Mapping[str, Any], *,
              login_hint: str | None) -> LinkRedirect | LinkedIdentity:
        username, password = request.get("username"), request.get("password")
        host = request.get("host", "imap.test")
        if not isinstance(username, str) or USERS.get(username) != password:
            raise InputError("the server refused this username and password", code="login_failed")
        return LinkedIdentity(address=username, display_name=username.split("@")[0].title(),
                              provider_user_id=f"imap:{host}:993:{username}",
                              credential=orjson.dumps({"password": password}).decode(), credential_kind="imap")

    def complete(self, account: Account, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        raise InputError("this provider has no sign-in redirect")


class VerifiedSignIn:
    """A redirect provider whose identity platform vouches for the address (Outlook's shape).

    The edge we cannot reach in process is the identity platform: here the
    callback's ``code`` names the person who signed in.
    """

    provider = Provider.OUTLOOK
    credential_kind = "msal"

    def begin(self, account_id: str, request: Mapping[str, Any], *, login_hint: str | None) -> LinkRedirect:
        state = uuid.uuid4().hex
        return LinkRedirect(authorize_url=f"https://login.test/authorize?state={state}", state=state,
                            flow={"state": state})

    def complete(self, account: Account, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        assert params["state"] == flow["state"]
        address = params["code"]
        return LinkedIdentity(address=address, display_name="Verified", provider_user_id=f"graph:{address}",
                              credential="{}", credential_kind="msal")


def service(t: LinkingTables, settings: Settings, queue: AzureJobQueue | None = None, *,
            oauth: bool = False) -> LinkingService:
    linkers: dict[Provider, Any] = {Provider.IMAP: PasswordLinker()}
    if oauth:
        linkers[Provider.OUTLOOK] = VerifiedSignIn()
    return LinkingService(
        accounts=t.accounts, tokens=t.tokens, flows=t.flows, access=AccountAccess(t.accounts),
        jobs=queue or AzureJobQueue(settings),
        return_urls=ReturnUrlPolicy.from_base(settings.return_url_allowlist, settings.public_base_url),
        linkers=linkers)


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
