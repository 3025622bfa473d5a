"""Small helpers for child processes on loopback: free ports, readiness, clean stops."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ServiceError(RuntimeError):
    """A service did not start; the message says which and why (with its log tail)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own clean-up has to do


def child_options(*, own_session: bool) -> dict[str, object]:
    """Popen options for a service: it dies with its parent (Linux), and optionally ignores our Ctrl-C.

    ``own_session`` keeps a terminal's Ctrl-C away from the child so the
    parent can stop things in order (the host drains before storage goes).
    """
    return {"start_new_session": own_session, "preexec_fn": _die_with_parent}


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


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process, and its whole group when it leads one (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)


def stop_process(process: subprocess.Popen[bytes] | None, grace_s: float = 10.0) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    _signal(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait(timeout=5)
