"""Small helpers for child processes on loopback: free ports, readiness, clean stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class ServiceError(RuntimeError):
    """A service did not start; the message says which and why (with its log tail)."""


def _die_with_parent(death_signal: signal.Signals) -> Callable[[], None]:
    def set_death_signal() -> None:  # runs in the child between fork and exec
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, death_signal)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # not Linux: the parent's own clean-up has to do

    return set_death_signal


def child_options(*, own_session: bool, stop_signal: signal.Signals = signal.SIGTERM) -> dict[str, object]:
    """Popen options for a service: it gets ``stop_signal`` when its parent dies (Linux), and optionally
    ignores our Ctrl-C.

    ``own_session`` keeps a terminal's Ctrl-C away from the child so the
    parent can stop things in order (the host drains before storage goes).
    ``stop_signal`` is the one the service saves its data on (Azurite's table
    service only on SIGINT), so even a parent killed outright loses nothing.
    """
    return {"start_new_session": own_session, "preexec_fn": _die_with_parent(stop_signal)}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now (for services that cannot report the port they bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], *, timeout: float, name: str,
                  log_path: Path | None = None) -> None:
    """Wait until ``host:port`` accepts connections; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"{name} exited with code {process.returncode} before listening on "
                               f"{host}:{port}\n{log_tail(log_path)}")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise ServiceError(f"{name} did not listen on {host}:{port} within {timeout:g} s\n{log_tail(log_path)}")


def site_port(site: Any, requested: int) -> int:
    """The port a started ``aiohttp.web.TCPSite`` listens on (``requested`` 0 picks a free one)."""
    server = site._server   # aiohttp exposes the bound port only here
    return int(server.sockets[0].getsockname()[1]) if server is not None and server.sockets else requested


def write_ready_file(ready: Path, answer: dict[str, Any]) -> None:
    """The child's half of ``wait_for_ready_file``: ``answer`` as JSON, whole or not at all (by rename)."""
    partial = ready.with_suffix(".tmp")
    partial.write_text(json.dumps(answer))
    partial.replace(ready)


def wait_for_ready_file(ready: Path, process: subprocess.Popen[bytes], *, timeout: float, name: str,
                        log_path: Path | None = None) -> dict[str, Any]:
    """Wait until the process writes ``ready`` (JSON, written whole: the services write it by rename); its
    contents. Fails early if the process dies, and stops it if it is not ready in time."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None:
            raise ServiceError(f"{name} exited with code {process.returncode}:\n{log_tail(log_path, 60)}")
        if time.monotonic() > deadline:
            stop_process(process, grace_s=5)
            raise ServiceError(f"{name} did not start within {timeout:g} s:\n{log_tail(log_path, 60)}")
        time.sleep(0.05)
    answer = json.loads(ready.read_text())
    if not isinstance(answer, dict):
        raise ServiceError(f"{name} wrote a ready file that is not a JSON object")
    return answer


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process, and its whole group when it leads one (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)


def stop_process(process: subprocess.Popen[bytes] | None, grace_s: float = 10.0,
                 stop_signal: signal.Signals = signal.SIGTERM) -> None:
    """``stop_signal`` (SIGTERM unless the service saves only on another), wait ``grace_s``, then SIGKILL."""
    stop_processes([process] if process is not None else [], grace_s, stop_signal)


def stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float = 10.0,
                   stop_signal: signal.Signals = signal.SIGTERM) -> None:
    """Signal every process once (they stop in parallel), wait up to ``grace_s`` in all, SIGKILL the rest.

    Once only: a service that handles its stop signal with a one-shot
    handler (Node's ``process.once``) dies unsaved on a second one.
    """
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal(process, stop_signal)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL)
            process.wait(timeout=5)
