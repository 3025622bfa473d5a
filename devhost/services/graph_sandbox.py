"""The Graph sandbox (``python -m graph_sandbox``) as a child process, for ``make run`` and benchmarks."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devhost.services.process import (
    ROOT,
    ServiceError,
    child_options,
    free_port,
    port_open,
    stop_process,
    wait_for_port,
)


@dataclass
class GraphSandbox:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process, grace_s=10)


def start_graph_sandbox(log_path: Path, *, host: str = "127.0.0.1", port: int = 0, args: list[str] | None = None,
                        timeout_s: float = 60.0, own_session: bool = False, root: Path = ROOT) -> GraphSandbox:
    """Start the sandbox on ``host:port`` (0 = a free port) with extra CLI ``args``; wait until it listens."""
    if not (root / "graph_sandbox" / "__main__.py").exists():
        raise ServiceError("graph_sandbox is not in this checkout")
    if port and port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use (another Graph sandbox running?)")
    port = port or free_port(host)
    command = [sys.executable, "-m", "graph_sandbox", "--host", host, "--port", str(port), *(args or [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
            **child_options(own_session=own_session))
    try:
        wait_for_port(host, port, process, timeout=timeout_s, name="Graph sandbox", log_path=log_path)
    except ServiceError:
        stop_process(process, grace_s=2)
        raise
    return GraphSandbox(url=f"http://{host}:{port}", process=process, log_path=log_path)
