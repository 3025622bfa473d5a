"""The embedded search store: osmem-server, an in-memory OpenSearch-compatible server (PyPI).

It keeps nothing across restarts; the sync engine notices the new store
generation and resyncs. Set ELASTICSEARCH_URL to use a real cluster instead.
The binary announces itself with one JSON line (``{"url": ...}``) on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from osmem_server import OsmemError, resolve_binary

from devhost.services.process import ServiceError, child_options, log_tail, port_open, stop_process


@dataclass
class SearchStore:
    """A running osmem-server."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process, grace_s=5)


def start_search_store(host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 30.0,
                       log_path: Path | None = None, own_session: bool = False) -> SearchStore:
    """Start osmem-server on ``host:port`` (0 = a free port); it exits with this process."""
    if port and port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use")
    try:
        binary = resolve_binary()
    except OsmemError as exc:
        raise ServiceError(str(exc)) from exc
    args = [binary, "--addr", f"{host}:{port}", "--parent-pid", str(os.getpid()), "--no-ja", "--no-stdin-watch"]
    stderr = log_path.open("ab") if log_path else subprocess.DEVNULL
    try:
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            args, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
            **child_options(own_session=own_session))
    finally:
        if log_path:
            stderr.close()  # type: ignore[union-attr]
    ready: dict[str, str] = {}

    def read_announcement() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and "url" in message:
                ready["url"] = str(message["url"])
                break
        # Keep draining so the server never blocks on a full pipe.
        for _ in process.stdout:
            pass

    threading.Thread(target=read_announcement, name="osmem-stdout", daemon=True).start()
    deadline_s = timeout_s
    waited = 0.0
    while "url" not in ready:
        if process.poll() is not None:
            raise ServiceError(f"osmem-server exited with code {process.returncode}\n{log_tail(log_path)}")
        if waited > deadline_s:
            stop_process(process, grace_s=2)
            raise ServiceError(f"osmem-server did not start within {timeout_s:g} s\n{log_tail(log_path)}")
        threading.Event().wait(0.02)
        waited += 0.02
    return SearchStore(url=ready["url"].rstrip("/"), process=process, log_path=log_path)
