"""Test helpers: change monitoring wired to a test's Azurite tables and queue."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient

from mailsync.jobs import decode_job
from mailsync.models import Account, AccountStatus, Job, Provider
from mailsync.monitoring.client_state import ClientStates
from mailsync.monitoring.lifecycle import LifecycleReceiver
from mailsync.monitoring.notifications import NotificationReceiver
from mailsync.monitoring.records import Subscription, SubscriptionKind
from mailsync.security.secrets import hash_secret, new_secret
from mailsync.settings import Settings
from mailsync.storage.connection import queue_client, table_client
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.subscriptions import TablePendingStore, TableSubscriptionStore
from mailsync.storage.sync_table import SyncStateTable
from mailsync.storage.table_errors import ensure_table
from tests.linking.tables import LinkingTables, linking_tables


@dataclass
class Harness:
    settings: Settings
    subscriptions: TableSubscriptionStore
    pending: TablePendingStore
    linking: LinkingTables
    queue: AzureJobQueue
    queue_client: QueueClient
    notifications: NotificationReceiver
    lifecycle: LifecycleReceiver
    signer: ClientStates
    sync_rows: SyncStateTable                 # the table the pending rows share with the sync rows
    client_states: dict[str, str] = field(default_factory=dict)

    @property
    def accounts(self) -> Any:
        return self.linking.accounts

    def add_account(self, status: AccountStatus = AccountStatus.SYNCED) -> str:
        now = datetime.now(UTC)
        account_id = uuid.uuid4().hex
        self.accounts.save(Account(account_id=account_id, provider=Provider.OUTLOOK, status=status,
                                   access_token_hash=hash_secret(new_secret()), created_at=now, updated_at=now))
        return account_id

    def add_subscription(self, account_id: str, resource: str = "me/messages", *,
                         signed: bool = False) -> tuple[str, str]:
        """A subscription row as SubscriptionManager writes it: (subscription id, clientState).

        ``signed``: a signed clientState (what SubscriptionManager gives new subscriptions); else a
        random one, as subscriptions created before signing have (the webhook reads their row).
        """
        subscription_id = str(uuid.uuid4())
        client_state = self.signer.new(account_id, SubscriptionKind.of_resource(resource)) if signed \
            else new_secret(48)
        now = datetime.now(UTC)
        self.subscriptions.put(Subscription(subscription_id, account_id, hash_secret(client_state),
                                            now + timedelta(days=2), now, resource=resource))
        self.client_states[subscription_id] = client_state
        return subscription_id, client_state

    def queued_count(self) -> int:
        """Every message on the queue, visible or still delayed (Storage's approximate count is exact here)."""
        return int(self.queue_client.get_queue_properties().approximate_message_count or 0)

    def drain(self, wait_s: float = 0.0) -> list[Job]:
        """Receive and delete every visible message (after ``wait_s`` for delayed ones)."""
        if wait_s:
            time.sleep(wait_s)
        jobs: list[Job] = []
        while True:
            batch = list(self.queue_client.receive_messages(max_messages=32, visibility_timeout=30))
            if not batch:
                return jobs
            for message in batch:
                jobs.append(decode_job(message.content))
                self.queue_client.delete_message(message)


def change(subscription_id: str, client_state: str | None, message_id: str,
           change_type: str = "updated", version: str | None = None) -> dict[str, Any]:
    """One changeNotification shaped like the ones Graph (and the sandbox) sends (``version``: its @odata.etag)."""
    item: dict[str, Any] = {
        "subscriptionId": subscription_id,
        "subscriptionExpirationDateTime": "2026-11-27T10:00:00.0000000Z",
        "changeType": change_type,
        "resource": f"Users/u/Messages/{message_id}",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": f"Users/u/Messages/{message_id}",
                         "id": message_id},
        "tenantId": "t",
    }
    if version is not None:
        item["resourceData"]["@odata.etag"] = version
    if client_state is not None:
        item["clientState"] = client_state
    return item


def make_harness(storage_env: dict[str, str], **settings: str) -> Harness:
    config = Settings.from_env({**storage_env, **settings})
    table = table_client(config, "subscriptions")
    ensure_table(table)
    subscriptions = TableSubscriptionStore(table)
    sync_table = table_client(config, "sync")
    ensure_table(sync_table)
    pending = TablePendingStore(sync_table, max_ids=config.notify_max_ids)
    linking = linking_tables(config)
    queue = AzureJobQueue(config)
    inspect = queue_client(config, config.sync_queue_name)
    with contextlib.suppress(ResourceExistsError):
        inspect.create_queue()
    signer = ClientStates([("test1", os.urandom(32))])
    return Harness(config, subscriptions, pending, linking, queue, inspect,
                   NotificationReceiver(config, subscriptions, linking.accounts, pending, queue, client_states=signer),
                   LifecycleReceiver(subscriptions, linking.accounts, queue), signer, SyncStateTable(sync_table))
