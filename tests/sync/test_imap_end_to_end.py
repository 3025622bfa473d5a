"""A Dovecot account through the same functions as Outlook: link, initial sync, changes, read, unlink (devhost).

POST /api/accounts with ``provider: imap`` (the login is checked, the
password sealed), the devhost's queue trigger runs the sync worker with the
IMAP provider, GET /api/accounts/{id} shows it ``synced``, the store equals
Dovecot, the read API lists the mail; then changes made by another IMAP
client are found by the STATUS poll (what the poll timer runs) and the
store follows; DELETE unlinks it, credential and documents included.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from devhost.services.process import free_port
from mailsync.linking.imap import IMAP, SealedCredentials
from mailsync.models import Provider
from mailsync.monitoring.imap_poll import ImapStatusPoller
from mailsync.providers.imap import ImapProviderFactory
from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.sync_table import SyncStateTable
from mailsync.store.engines import connect
from mailsync.store.search_store import SearchStore, StoreOptions
from mailsync.sync.invocation import REAUTH_MESSAGES
from tests.fixtures.devhost import DevhostProcess, app_settings, start_devhost
from tests.fixtures.dovecot import DovecotServer, ImapUser, rfc822
from tests.linking.tables import LinkingTables, linking_tables
from tests.providers.imap_harness import seed_messages
from tests.sync.imap_support import compare_views

KEY = bytes(range(40, 72))
KEY_ENTRY = f"imap1:{base64.b64encode(KEY).decode()}"
FUNCTIONS = ["oauth_start", "account_get", "account_delete", "sync_worker", "mail_messages"]


@dataclass
class Stack:
    host: DevhostProcess
    settings: Settings
    store: SearchStore
    tables: LinkingTables

    @property
    def api(self) -> str:
        return f"{self.host.base_url}/api"


@pytest.fixture(scope="module")
def stack(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from mailsync.security.crypto import TokenCipher

    port = free_port()
    env = app_settings(name="imap", storage=azurite.connection_string, search_store_url=search_store_url, port=port,
                       local_dir=tmp_path_factory.mktemp("local"), key_entry=KEY_ENTRY,
                       SIGNALR_HUB="mailsync", IMAP_ALLOW_INSECURE="1", IMAP_PAGE_SIZE="100", SYNC_TIME_BUDGET_S="5")
    host = start_devhost(env, port=port, functions=FUNCTIONS, log_dir=tmp_path_factory.mktemp("devhost"))
    settings = Settings.from_env(env)
    store = SearchStore(connect(search_store_url), StoreOptions(prefix=settings.index_prefix))
    try:
        yield Stack(host, settings, store, linking_tables(settings, TokenCipher([("imap1", KEY)])))
    finally:
        host.stop(timeout_s=15)
        store.close()


def _wait(predicate: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _link(stack: Stack, user: ImapUser) -> tuple[str, dict[str, str]]:
    answer = requests.post(f"{stack.api}/accounts", timeout=60, json={
        "provider": "imap", "host": user.host, "port": user.port, "security": "none",
        "username": user.username, "password": user.password, "display_name": "Dovecot test"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["status"] == "syncing" and body["authorize_url"] is None
    return body["account_id"], {"Authorization": f"Bearer {body['access_token']}"}


def test_a_dovecot_account_links_syncs_follows_changes_and_unlinks(stack: Stack, dovecot: DovecotServer) -> None:
    import random

    user = dovecot.add_user()
    user.seed_maildir(seed_messages(random.Random(5), {"INBOX": 300, "Archive": 150, "Projects": 40}))
    account_id, auth = _link(stack, user)

    def status() -> str:
        return str(requests.get(f"{stack.api}/accounts/{account_id}", headers=auth, timeout=30).json()["status"])

    _wait(lambda: status() == "synced")
    view = requests.get(f"{stack.api}/accounts/{account_id}", headers=auth, timeout=30).json()
    assert view["provider"] == "imap" and view["address"] == f"{user.username}@{user.host}"
    assert view["sync"]["folders_done"] == view["sync"]["folders_total"] == 7   # 3 seeded + 4 auto-created
    difference = compare_views(user, stack.store, account_id)
    assert not difference, difference.summary()
    listed = requests.get(f"{stack.api}/accounts/{account_id}/messages", headers=auth, params={"limit": 5},
                          timeout=30).json()
    assert len(listed["messages"]) == 5

    # Another client changes things; the STATUS poll (the poll timer's IMAP half) enqueues the rounds.
    client = user.connect()
    client.select_folder("Archive")
    uids = client.search("ALL")
    client.add_flags(uids[:3], [b"\\Flagged", b"Work"])
    client.move(uids[3:5], "INBOX")
    client.add_flags(uids[5:6], [b"\\Deleted"])
    client.uid_expunge(uids[5:6])
    client.append("INBOX", rfc822("end to end: new mail"))
    client.create_folder("Made later")
    client.append("Made later", rfc822("in the new folder"))
    client.logout()
    factory = ImapProviderFactory(stack.settings, SealedCredentials(stack.tables.tokens))
    poller = ImapStatusPoller(stack.tables.accounts, SyncStateTable(table_client(stack.settings, "sync")),
                              factory.connect, AzureJobQueue(stack.settings))
    report = poller.tick([account_id])
    assert report.jobs >= 3 and report.errors == 0

    def converged() -> bool:
        return not compare_views(user, stack.store, account_id)

    _wait(converged)
    assert poller.tick([account_id]).jobs == 0, "settled: nothing moved since the last rounds"

    assert requests.delete(f"{stack.api}/accounts/{account_id}", headers=auth, timeout=30).status_code == 204
    assert stack.tables.tokens.read(account_id, IMAP) is None
    stack.store.refresh()
    assert stack.store.list_folders(account_id) == []


def test_a_password_changed_at_the_server_asks_to_link_again_and_keeps_the_mail(
        stack: Stack, dovecot_refusals: DovecotServer) -> None:
    import random

    # The Dovecot meant for refused logins: its failed-login penalty must not slow the other tests.
    dovecot = dovecot_refusals
    user = dovecot.add_user()
    user.seed_maildir(seed_messages(random.Random(6), {"INBOX": 30}))
    account_id, auth = _link(stack, user)

    def view() -> dict[str, Any]:
        return dict(requests.get(f"{stack.api}/accounts/{account_id}", headers=auth, timeout=30).json())

    _wait(lambda: view()["status"] == "synced")
    dovecot.change_password(user, "changed-" + user.password)

    # The next poll meets the refusal and leaves it to the engine, which tells the page what to do.
    factory = ImapProviderFactory(stack.settings, SealedCredentials(stack.tables.tokens))
    poller = ImapStatusPoller(stack.tables.accounts, SyncStateTable(table_client(stack.settings, "sync")),
                              factory.connect, AzureJobQueue(stack.settings))
    poller.tick([account_id])
    _wait(lambda: view()["status"] == "reauth_required", timeout_s=60)
    assert view()["error"] == REAUTH_MESSAGES[Provider.IMAP]
    listed = requests.get(f"{stack.api}/accounts/{account_id}/messages", headers=auth, params={"limit": 50},
                          timeout=30).json()
    assert len(listed["messages"]) == 30, "the synced mail stays readable until the account is linked again"
