"""What a notification costs: the webhook, the NOTIFIED job's resolution, and the alternative.

Usage::

    .venv/bin/python -m bench.change_monitoring [--messages 2000] [--latency-ms 0]

Starts Azurite, the embedded search node and a Graph sandbox (one user, ``--messages``
messages, ``--latency-ms`` per Graph request to imitate the network), puts
the whole mailbox in the store (as after the initial sync), and then, for
a few realistic situations, measures:

* the webhook's use case: ms per POST of 50 notifications, jobs enqueued;
* the NOTIFIED job: Graph requests it makes, folders it resolves, ms;
* the incremental delta round those folders then need (requests, ms), and
  the same for **every** folder — the "sync everything on each
  notification" alternative.

Graph requests are counted by the sandbox. Prints a table and a final
``key=value`` line.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devhost.services.azurite import start_azurite
from graph_sandbox.config import SandboxConfig
from graph_sandbox.server import SandboxServer
from mailsync.models import Account, AccountStatus, Folder, Message, Provider
from mailsync.monitoring.graph_api import GraphMessageLocator, GraphSubscriptionApi
from mailsync.monitoring.handler import MonitoringJobs
from mailsync.monitoring.notifications import NotificationReceiver
from mailsync.monitoring.records import Subscription
from mailsync.monitoring.subscriptions import SubscriptionManager
from mailsync.providers.graph_client import GraphClient
from mailsync.security.crypto import TokenCipher
from mailsync.security.secrets import hash_secret, new_secret
from mailsync.settings import Settings
from mailsync.storage.accounts import TableAccountRepository
from mailsync.storage.connection import table_client
from mailsync.storage.job_queue import AzureJobQueue
from mailsync.storage.subscriptions import TablePendingStore, TableSubscriptionStore
from mailsync.storage.sync_table import SyncStateTable
from mailsync.storage.table_errors import ensure_table
from mailsync.storage.tokens import TableTokenStore
from mailsync.store.engines import connect
from mailsync.store.search_store import SearchStore, StoreOptions
from tests.graph_sandbox.signin import user_tokens


class Bench:
    def __init__(self, sandbox_url: str, settings: Settings, store: SearchStore, user: str) -> None:
        self.url = sandbox_url
        self.settings = settings
        self.store = store
        token = str(user_tokens(sandbox_url, user)[0]["access_token"])
        self.graph = GraphClient(lambda _force: token, base_url=f"{sandbox_url}/v1.0")
        self.user = user
        accounts_table = table_client(settings, "accounts")
        ensure_table(accounts_table)
        cipher = TokenCipher([("b1", base64.b64decode(base64.b64encode(bytes(range(32)))))])
        self.accounts = TableAccountRepository(accounts_table, TableTokenStore(accounts_table, cipher))
        monitor_table = table_client(settings, "subscriptions")
        ensure_table(monitor_table)
        self.subscriptions = TableSubscriptionStore(monitor_table)
        sync_table = table_client(settings, "sync")
        ensure_table(sync_table)
        # The pending rows share the account's partition with its sync rows.
        self.pending = TablePendingStore(sync_table, max_ids=settings.notify_max_ids)
        self.queue = AzureJobQueue(settings)
        now = datetime.now(UTC)
        self.account = uuid.uuid4().hex
        self.accounts.save(Account(self.account, Provider.OUTLOOK, AccountStatus.SYNCED, "x", now, now))
        self.subscription = str(uuid.uuid4())
        self.client_state = new_secret(48)
        self.subscriptions.put(Subscription(self.subscription, self.account, hash_secret(self.client_state),
                                            now.replace(year=now.year + 1), now))
        self.receiver = NotificationReceiver(settings, self.subscriptions, self.accounts, self.pending, self.queue)
        client_for: Callable[[str], GraphClient] = lambda _account: self.graph  # noqa: E731
        manager = SubscriptionManager(settings, self.subscriptions, GraphSubscriptionApi(client_for), self.accounts,
                                      self.queue)
        self.jobs = MonitoringJobs(self.pending, self.accounts, store, GraphMessageLocator(client_for), manager,
                                   self.queue, rows=SyncStateTable(sync_table).load)
        self.delta_links: dict[str, str] = {}

    def requests_served(self) -> int:
        return int(requests.get(f"{self.url}/sandbox/counters", timeout=10).json()["requests"])

    def snapshot(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.url}/sandbox/mailboxes/{self.user}/snapshot", timeout=60).json())

    def load_store(self) -> dict[str, Any]:
        snap = self.snapshot()
        self.store.upsert_folders([Folder(self.account, f["id"], f["displayName"]) for f in snap["folders"]])
        self.store.upsert_messages([Message(self.account, m["id"], m["folderId"], version=1)
                                    for m in snap["messages"]])
        self.store.refresh()
        for folder in snap["folders"]:
            self.delta_links[folder["id"]] = self.round(folder["id"], None)[2]
        return snap

    def round(self, folder_id: str, link: str | None) -> tuple[int, int, str]:
        """One delta round of a folder: (requests, changes seen, the new deltaLink)."""
        url = link or f"me/mailFolders/{folder_id}/messages/delta"
        count = changes = 0
        while True:
            page = self.graph.get(url, headers={"Prefer": "odata.maxpagesize=500"})
            count += 1
            changes += len(page.get("value", []))
            if "@odata.nextLink" in page:
                url = page["@odata.nextLink"]
                continue
            return count, changes, str(page["@odata.deltaLink"])

    def sync_rounds(self, folders: list[str]) -> tuple[int, float]:
        started = time.perf_counter()
        total = 0
        for folder in folders:
            count, _, link = self.round(folder, self.delta_links[folder])
            self.delta_links[folder] = link
            total += count
        return total, 1000 * (time.perf_counter() - started)

    def notify(self, changes: list[tuple[str, str]]) -> tuple[float, int]:
        """Send ``changes`` as the sandbox would (50 per POST): (ms per POST, NOTIFIED jobs enqueued)."""
        timings, enqueued = [], 0
        for start in range(0, len(changes), 50):
            body = {"value": [{"subscriptionId": self.subscription, "clientState": self.client_state,
                               "changeType": ct, "resource": f"Users/u/Messages/{mid}",
                               "resourceData": {"id": mid}} for ct, mid in changes[start:start + 50]]}
            began = time.perf_counter()
            enqueued += self.receiver.receive(body).jobs_enqueued
            timings.append(1000 * (time.perf_counter() - began))
        return sum(timings) / len(timings), enqueued

    def scenario(self, name: str, changes: list[tuple[str, str]], all_folders: list[str]) -> dict[str, Any]:
        post_ms, notified = self.notify(changes)
        before = self.requests_served()
        began = time.perf_counter()
        sent = self.jobs.notified(self.account)
        resolve_ms = 1000 * (time.perf_counter() - began)
        lookups = self.requests_served() - before
        folders = [j.folder_id for j in sent if j.folder_id is not None]
        targeted_requests, targeted_ms = self.sync_rounds(folders)
        everything_requests, everything_ms = self.sync_rounds(all_folders)
        return {"scenario": name, "notifications": len(changes), "post_ms": post_ms, "notified_jobs": notified,
                "lookups": lookups, "resolve_ms": resolve_ms, "sync_jobs": len(sent),
                "targeted_requests": lookups + targeted_requests, "targeted_ms": resolve_ms + targeted_ms,
                "all_folders_requests": everything_requests, "all_folders_ms": everything_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--latency-ms", type=int, default=0)
    args = parser.parse_args()

    from devhost.services.search_node import start_search_node

    work = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    azurite = start_azurite(work / "azurite")
    node = start_search_node(work / "search-node")
    sandbox = SandboxServer(SandboxConfig(seed=3, users=1, messages_per_user=args.messages,
                                          latency_ms=args.latency_ms, allow_http_loopback_webhooks=True),
                            port=0)
    url = sandbox.start()
    try:
        settings = Settings.from_env({"AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": "bench",
                                      "SYNC_QUEUE_NAME": "bench", "GRAPH_SANDBOX_URL": url,
                                      "NOTIFY_COALESCE_S": "0"})
        store = SearchStore(connect(node.url), StoreOptions(prefix=f"b{uuid.uuid4().hex[:8]}"))
        store.ensure_ready()
        user = str(requests.get(f"{url}/sandbox/users", timeout=10).json()["users"][0]["mail"])
        bench = Bench(url, settings, store, user)
        snap = bench.load_store()
        folders = [f["id"] for f in snap["folders"]]
        inbox = next(f["id"] for f in snap["folders"] if f["wellKnownName"] == "inbox")
        archive = next(f["id"] for f in snap["folders"] if f["wellKnownName"] == "archive")
        ids = [m["id"] for m in snap["messages"]]
        rows = []

        graph = bench.graph
        graph.request("PATCH", f"me/messages/{ids[0]}", json_body={"isRead": True})
        rows.append(bench.scenario("mark one read", [("updated", ids[0])], folders))

        delivered = requests.post(f"{url}/sandbox/mailboxes/{user}/deliver", json={"count": 1}, timeout=10).json()
        rows.append(bench.scenario("one new mail", [("created", delivered["delivered"][0]["id"])], folders))

        graph.request("POST", f"me/messages/{ids[1]}/move", json_body={"destinationId": archive})
        rows.append(bench.scenario("move one", [("created", ids[1]), ("deleted", ids[1])], folders))

        for mid in ids[2:12]:
            graph.request("PATCH", f"me/messages/{mid}", json_body={"flag": {"flagStatus": "flagged"}})
        rows.append(bench.scenario("flag ten", [("updated", mid) for mid in ids[2:12]], folders))

        many = [("updated", mid) for mid in ids[12:1012]]
        for _, mid in many:
            graph.request("PATCH", f"me/messages/{mid}", json_body={"isRead": False})
        rows.append(bench.scenario("burst of 1000", many, folders))

        print(f"\nmailbox: {len(ids)} messages in {len(folders)} folders; Graph latency {args.latency_ms} ms; "
              f"inbox {inbox[:8]}…")
        header = (f"{'scenario':<16}{'notif':>6}{'POST ms':>9}{'NOTIFIED':>9}{'lookups':>8}{'resolve ms':>11}"
                  f"{'jobs':>6}{'targeted req/ms':>17}{'all folders req/ms':>20}")
        print(header)
        for r in rows:
            print(f"{r['scenario']:<16}{r['notifications']:>6}{r['post_ms']:>9.1f}{r['notified_jobs']:>9}"
                  f"{r['lookups']:>8}{r['resolve_ms']:>11.1f}{r['sync_jobs']:>6}"
                  f"{r['targeted_requests']:>9}/{r['targeted_ms']:<7.0f}"
                  f"{r['all_folders_requests']:>11}/{r['all_folders_ms']:<8.0f}")
        print("result " + " ".join(f"{r['scenario'].replace(' ', '_')}_targeted_requests={r['targeted_requests']}"
                                   f" {r['scenario'].replace(' ', '_')}_all_requests={r['all_folders_requests']}"
                                   for r in rows))
        store.close()
    finally:
        sandbox.stop()
        node.stop()
        azurite.stop()


if __name__ == "__main__":
    main()
