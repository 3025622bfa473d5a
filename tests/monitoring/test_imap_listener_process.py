"""``python -m mailsync.providers.imap_listener`` as a platform runs it: started, then stopped by a signal.

A platform (Container Apps, systemd, the devhost's stack) stops a process
with SIGTERM; Ctrl-C is SIGINT. Either way the listener must stop its
watchers, enqueue the changes it already noticed, say so, and exit 0 — not
die mid-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devhost.services.devhost_process import INHERITED_ENV
from devhost.services.process import ROOT
from tests.fixtures.azurite import unique_name
from tests.web.conftest import KEY_ENTRY


def start_listener(azurite: Any, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV}
    env.update({"AzureWebJobsStorage": azurite.connection_string, "SYNC_QUEUE_NAME": unique_name("lst"),
                "TABLE_PREFIX": unique_name("l"), "TOKEN_ENCRYPTION_KEYS": KEY_ENTRY, "LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1"})
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "mailsync.providers.imap_listener", "--refresh-s", "0.5"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for_line(log_path: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log_path.read_text(errors="replace"):
            return
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the listener's log:\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_listener_stops_cleanly_on_a_signal(azurite: Any, tmp_path: Path, stop_signal: signal.Signals) -> None:
    log_path = tmp_path / "listener.log"
    listener = start_listener(azurite, log_path)
    try:
        wait_for_line(log_path, "IMAP listener started", listener)
        time.sleep(0.6)   # one refresh of the (empty) account list has run
        listener.send_signal(stop_signal)
        assert listener.wait(timeout=15) == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    log = log_path.read_text(errors="replace")
    assert "IMAP listener stopped" in log
    assert "Traceback" not in log, log[-3000:]
