"""``make run`` stopped and started again keeps every message; a lost store is noticed and resynced.

The whole stack as a person runs it (``python -m devhost.stack``: Azurite,
the embedded OpenSearch node, the Graph sandbox, the devhost), on free
ports and a data directory of its own, with an IMAP account on the test
Dovecot:

1. link the account, wait for ``synced``, and stop the stack *at once*
   (SIGTERM to its process group, as ``kill -TERM`` on ``make run`` or a
   Ctrl-C right after linking would): Azurite saves every table and the
   node flushes its shards on the way out;
2. start it again: the account is there, ``synced``, with the same
   messages listed on the first request, and no folder started over
   (its sync rows keep their epochs);
3. delete the indices (a lost or restored cluster): without any mail
   change, the next poll tick notices and the account resyncs; meanwhile it
   never reads ``synced`` over the empty list.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from devhost.services.azurite import connection_string
from devhost.services.process import ROOT, free_port, log_tail
from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from mailsync.storage.sync_table import SyncStateTable
from mailsync.store.mappings import IndexNames
from tests.fixtures.dovecot import LOOPBACK_HOSTS, DovecotServer, ImapUser
from tests.providers.imap_harness import seed_messages

SEEDED = {"INBOX": 120, "Archive": 60}
PREFIX = "restart"
# One poll tick (the poll_scheduler timer fires every minute) plus the resync of this small mailbox.
NOTICE_AND_RESYNC_S = 60 + 60
# The account summary reads the store's generation at most this often (mailsync.sync.status).
GENERATION_TTL_S = 5.0


@dataclass
class RunningStack:
    """One ``python -m devhost.stack`` process and the URLs it announced."""

    process: subprocess.Popen[bytes]
    log_path: Path
    api: str
    node_url: str
    storage: str

    def stop(self) -> float:
        """SIGTERM to the stack's process group; returns how long the orderly stop took."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"the stack did not stop\n{log_tail(self.log_path)}") from None
        assert code == 0, f"the stack exited with {code}\n{log_tail(self.log_path)}"
        return time.monotonic() - started


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTICSEARCH_", "AzureWebJobs"))}
    port = free_port()
    env.update({
        # Empty means "not configured": the stack starts its own services, whatever local.settings.json says.
        "ELASTICSEARCH_URL": "", "AzureWebJobsStorage": "", "MS_CLIENT_ID": "", "GRAPH_SANDBOX_URL": "",
        "TABLE_PREFIX": PREFIX, "ELASTICSEARCH_INDEX_PREFIX": PREFIX, "SYNC_QUEUE_NAME": f"{PREFIX}-sync",
        "IMAP_ALLOW_INSECURE": "1", "IMAP_ALLOWED_HOSTS": LOOPBACK_HOSTS, "LOG_FORMAT": "text",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", "STACK_TEST_PORT": str(port),
    })
    return env


def _announced(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"the stack did not announce {pattern!r}"
    return match.group(1)


def start_stack(data_dir: Path, env: dict[str, str], log_path: Path, timeout_s: float = 240.0,
                workers: int = 0) -> RunningStack:
    """Start the stack as ``make run`` does (``make run WORKERS=n``), in its own process group; wait for "ready"."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "devhost.stack", "--free-ports", "--port", env["STACK_TEST_PORT"],
             "--data-dir", str(data_dir), "--workers", str(workers)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")   # this run's lines only
        if "stack: ready in" in text:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"the stack did not start\n{log_tail(log_path, 60)}")
        time.sleep(0.2)
    queue_port, table_port = (int(p) for p in re.findall(
        r"Azurite queues http://127.0.0.1:(\d+), tables http://127.0.0.1:(\d+)", text)[0])
    return RunningStack(process=process, log_path=log_path,
                        api=_announced(r"stack:   API     (http://\S+/api)/", text),
                        node_url=_announced(r"search node \(OpenSearch\) (http://\S+) ", text),
                        storage=connection_string(queue_port=queue_port, table_port=table_port))


@pytest.fixture
def stack_env() -> dict[str, str]:
    return _env()


@pytest.fixture
def running(tmp_path: Path, stack_env: dict[str, str]) -> Iterator[Callable[..., RunningStack]]:
    """``running()`` starts the stack on this test's data directory; whatever is left running is stopped."""
    started: list[RunningStack] = []

    def start(workers: int = 0) -> RunningStack:
        stack = start_stack(tmp_path / "local", stack_env, tmp_path / "stack.log", workers=workers)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        if stack.process.poll() is None:
            stack.stop()


def _link(api: str, user: ImapUser) -> tuple[str, dict[str, str]]:
    answer = requests.post(f"{api}/accounts", timeout=60, json={
        "provider": "imap", "host": user.host, "port": user.port, "security": "none",
        "username": user.username, "password": user.password, "display_name": "Restart test"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    return body["account_id"], {"Authorization": f"Bearer {body['access_token']}"}


def _account(api: str, account_id: str, auth: dict[str, str]) -> dict[str, Any]:
    answer = requests.get(f"{api}/accounts/{account_id}", headers=auth, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _listed(api: str, account_id: str, auth: dict[str, str]) -> set[str]:
    """Every message id the mail page would list (all pages)."""
    ids: set[str] = set()
    params: dict[str, str] = {"limit": "200"}
    while True:
        answer = requests.get(f"{api}/accounts/{account_id}/messages", headers=auth, params=params, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        ids.update(m["message_id"] for m in body["messages"])
        if not body.get("next_cursor"):
            return ids
        params["cursor"] = body["next_cursor"]


def _epochs(storage: str, account_id: str) -> dict[str | None, int]:
    """The account's sync rows' epochs: each full round (a resync) starts a new one, from the clock."""
    settings = Settings.from_env({"AzureWebJobsStorage": storage, "TABLE_PREFIX": PREFIX})
    rows = SyncStateTable(table_client(settings, "sync")).load(account_id)
    assert rows.folder_list is not None
    return {None: rows.folder_list.epoch, **{fid: row.epoch for fid, row in rows.folders.items()}}


def test_a_restart_right_after_the_sync_keeps_everything_and_a_lost_store_is_resynced(
        running: Callable[..., RunningStack], dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    user.seed_maildir(seed_messages(random.Random(14), SEEDED))
    total = sum(SEEDED.values())

    first = running()
    account_id, auth = _link(first.api, user)
    deadline = time.monotonic() + 120
    while _account(first.api, account_id, auth)["status"] != "synced":
        assert time.monotonic() < deadline, "the account did not sync"
        time.sleep(0.1)
    # The epochs as the sync left them. (Not the clock at the stop: a round's epoch is the previous one + 1
    # when that is ahead of the clock's second, so a sync that ended within a second of the stop shows one
    # "after" it.)
    synced_epochs = _epochs(first.storage, account_id)
    # At once, as a person pressing Ctrl-C right after linking: no timer has saved anything yet.
    first.stop()

    second = running(workers=1)   # and one more queue-trigger process (make run WORKERS=1) from here on
    assert "worker 1: queue trigger only" in second.log_path.read_text(errors="replace")
    view = _account(second.api, account_id, auth)   # the account (Azurite) and its token survived
    assert (view["status"], view["sync"]["phase"]) == ("synced", "synced")
    listed = _listed(second.api, account_id, auth)
    assert len(listed) == total, "every message, on the first request"
    epochs = _epochs(second.storage, account_id)
    assert epochs == synced_epochs, "no folder started over after the restart"

    # A lost cluster: the indices go; no mail changes, nothing is queued.
    names = IndexNames(PREFIX)
    deleted = requests.delete(f"{second.node_url}/{names.messages_index},{names.mailboxes_index}", timeout=30)
    assert deleted.status_code == 200, deleted.text
    lost_at = time.monotonic()
    while True:
        elapsed = time.monotonic() - lost_at
        assert elapsed < NOTICE_AND_RESYNC_S, f"not resynced {elapsed:.0f} s after the store was lost"
        now_listed = _listed(second.api, account_id, auth)
        status = _account(second.api, account_id, auth)["status"]
        if now_listed == listed and status == "synced":
            break
        if elapsed > GENERATION_TTL_S:
            assert status != "synced", f"synced over {len(now_listed)} of {total} messages"
        time.sleep(0.5)
    resynced = _epochs(second.storage, account_id)
    assert all(resynced[key] > epochs[key] for key in epochs), "every folder went through a full round"
