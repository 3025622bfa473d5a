"""The SignalR Service stand-in (``python -m devhost.signalr_server``) as a child process, for benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from devhost.services.devhost_process import INHERITED_ENV
from devhost.services.process import ROOT, child_options, stop_process, wait_for_ready_file
from devhost.signalr_server import ACCESS_KEY_ENV


@dataclass
class SignalRServiceProcess:
    """The service's ``endpoint`` (``http://host:port/signalr``) and its process."""

    endpoint: str
    access_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def connection_string(self) -> str:
        """What ``AzureSignalRConnectionString`` holds for an app using this service."""
        return f"Endpoint={self.endpoint};AccessKey={self.access_key};Version=1.0;"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process, grace_s=10)


def start_signalr_service(log_path: Path, access_key: str, *, timeout_s: float = 30.0) -> SignalRServiceProcess:
    """Start the service on a free loopback port and wait until it listens."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ready = Path(tempfile.mkdtemp(prefix="signalr-", dir=log_path.parent)) / "ready.json"
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.update({"PYTHONUNBUFFERED": "1", ACCESS_KEY_ENV: access_key})
    command = [sys.executable, "-m", "devhost.signalr_server", "--ready-file", str(ready)]
    with log_path.open("ab") as log:
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
            **child_options(own_session=False))
    answer = wait_for_ready_file(ready, process, timeout=timeout_s, name="the SignalR service", log_path=log_path)
    return SignalRServiceProcess(str(answer["url"]), access_key, process, log_path)
