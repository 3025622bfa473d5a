"""Azurite (queues and tables) from node_modules, with its data on disk.

Never ``--inMemoryPersistence``: measured here, Azurite 3.35's in-memory
queue stalls for 25 s to minutes once a few thousand messages have passed
(its cleanup pass); on disk it ran 40k messages without a stall.

How it persists, and why it is stopped with SIGINT: Azurite keeps queue and
table metadata (every table entity, every queue's message index) in LokiJS
databases held in memory and written to ``--location`` by LokiJS's
*autosave*, every 5 s, and by ``close()``. ``close()`` runs from the
service's own signal handlers: the queue service handles SIGINT and
SIGTERM, but the table service (3.35, ``dist/src/table/main.js``) only
SIGINT. A SIGTERM therefore kills the table service with up to 5 s of
writes unsaved: an account linked just before a stop was lost. So both
services are stopped with SIGINT and waited for, and SIGINT is also what
they get if this process dies first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from devhost.services.process import (
    ROOT,
    ServiceError,
    child_options,
    free_port,
    port_open,
    stop_processes,
    wait_for_port,
)

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# The signal on which both services save their LokiJS databases (see above).
STOP_SIGNAL = signal.SIGINT
DEFAULT_QUEUE_PORT = 10001
DEFAULT_TABLE_PORT = 10002


def connection_string(host: str = "127.0.0.1", queue_port: int = DEFAULT_QUEUE_PORT,
                      table_port: int = DEFAULT_TABLE_PORT) -> str:
    """The storage connection string for an Azurite serving queues and tables on these ports."""
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"QueueEndpoint=http://{host}:{queue_port}/{ACCOUNT};"
            f"TableEndpoint=http://{host}:{table_port}/{ACCOUNT};")


@dataclass
class Azurite:
    """A running Azurite (one process for queues, one for tables)."""

    host: str
    queue_port: int
    table_port: int
    location: Path
    log_path: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def connection_string(self) -> str:
        return connection_string(self.host, self.queue_port, self.table_port)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        """SIGINT both services at once, and wait for each to save its databases and exit."""
        stop_processes(self.processes, grace_s=15, stop_signal=STOP_SIGNAL)


def _binary(root: Path, service: str) -> Path:
    path = root / "node_modules" / ".bin" / f"azurite-{service}"
    if not path.exists():
        raise ServiceError(f"{path} is missing: run `npm ci` (or `make deps`) in {root}")
    return path


def _start_one(root: Path, service: str, host: str, port: int, location: Path,
               log_path: Path, own_session: bool) -> subprocess.Popen[bytes]:
    args = [str(_binary(root, service)), f"--{service}Host", host, f"--{service}Port", str(port),
            "--location", str(location), "--skipApiVersionCheck", "--disableTelemetry", "--silent"]
    with log_path.open("ab") as log:
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
            **child_options(own_session=own_session, stop_signal=STOP_SIGNAL))
        return process


def start_azurite(location: Path, *, host: str = "127.0.0.1", queue_port: int = 0, table_port: int = 0,
                  root: Path = ROOT, timeout_s: float = 30.0, log_path: Path | None = None,
                  own_session: bool = False) -> Azurite:
    """Start Azurite's queue and table services with data under ``location``; port 0 = a free port.

    The processes die with this one (Linux). ``own_session`` shields them
    from the terminal's Ctrl-C so the caller can stop things in order.
    """
    location.mkdir(parents=True, exist_ok=True)
    log_path = log_path or location / "azurite.log"
    for port in (queue_port, table_port):
        if port and port_open(host, port):
            raise ServiceError(f"port {host}:{port} is already in use (another Azurite running?)")
    last_error: ServiceError | None = None
    for _attempt in range(3):  # a free port can be taken between asking and binding: retry
        ports = {"queue": queue_port or free_port(host), "table": table_port or free_port(host)}
        azurite = Azurite(host=host, queue_port=ports["queue"], table_port=ports["table"], location=location,
                          log_path=log_path)
        try:
            for service, port in ports.items():
                azurite.processes.append(_start_one(root, service, host, port, location, log_path, own_session))
            for process, (service, port) in zip(azurite.processes, ports.items(), strict=True):
                wait_for_port(host, port, process, timeout=timeout_s, name=f"Azurite {service}", log_path=log_path)
            return azurite
        except ServiceError as exc:
            azurite.stop()
            last_error = exc
            if queue_port and table_port:
                break
    assert last_error is not None
    raise last_error
