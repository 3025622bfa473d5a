"""Azurite as the stack runs it: whatever it acknowledged survives a stop right after the write.

Azurite saves tables and queue metadata every 5 s (LokiJS autosave) and on
a clean close; these tests write and stop at once, well inside that window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueClient

from devhost.services.azurite import Azurite, connection_string, start_azurite
from devhost.services.process import ROOT


def _write(conn: str) -> None:
    table = TableServiceClient.from_connection_string(conn).create_table_if_not_exists("kept")
    table.upsert_entity({"PartitionKey": "account", "RowKey": "a1", "status": "synced"})
    queue = QueueClient.from_connection_string(conn, "kept")
    queue.create_queue()
    queue.send_message("job")


def _assert_kept(azurite: Azurite) -> None:
    table = TableServiceClient.from_connection_string(azurite.connection_string).get_table_client("kept")
    assert [dict(e) for e in table.list_entities()] == [
        {"PartitionKey": "account", "RowKey": "a1", "status": "synced"}]
    queue = QueueClient.from_connection_string(azurite.connection_string, "kept")
    assert [m.content for m in queue.peek_messages()] == ["job"]


def test_a_stop_right_after_a_write_keeps_it(tmp_path: Path) -> None:
    azurite = start_azurite(tmp_path)
    try:
        _write(azurite.connection_string)
    finally:
        azurite.stop()
    # Both saved and exited on their own (a SIGKILL after the grace would show as -9).
    assert [p.returncode for p in azurite.processes] == [0, 0]
    again = start_azurite(tmp_path)
    try:
        _assert_kept(again)
    finally:
        again.stop()


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent to reap it counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


_PARENT = """
import json, sys, time
from pathlib import Path
from devhost.services.azurite import start_azurite
azurite = start_azurite(Path(sys.argv[1]), own_session=True)
print(json.dumps({"queue": azurite.queue_port, "table": azurite.table_port,
                  "pids": [p.pid for p in azurite.processes]}), flush=True)
time.sleep(600)
"""


def test_a_killed_parent_still_leaves_the_data_saved(tmp_path: Path) -> None:
    # The stack killed outright (kill -9, a second Ctrl-C) never runs its stop: Azurite
    # then gets its death signal, which must be the one it saves on.
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)], stdout=subprocess.PIPE,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        ports = json.loads(parent.stdout.readline())
        _write(connection_string(queue_port=ports["queue"], table_port=ports["table"]))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in ports["pids"]):
        assert time.monotonic() < deadline, "Azurite outlived its parent"
        time.sleep(0.05)
    again = start_azurite(tmp_path)
    try:
        _assert_kept(again)
    finally:
        again.stop()
