"""``python -m devhost.stack`` (what ``make run`` runs): every local service, then the devhost.

Starts, in order, only what is not configured already (local.settings.json
Values and the environment, the environment winning):

* Azurite (queues, tables) on 10001/10002 with data under .local/azurite,
  unless AzureWebJobsStorage names something other than development storage;
* the search node (OpenSearch, built from search_node/) on 9200 with its
  data under .local/search-node, unless ELASTICSEARCH_URL is set; without
  Java 17+ or Maven, osmem-server (in memory) instead, said in one line;
* the Graph sandbox on 7081 unless MS_CLIENT_ID or GRAPH_SANDBOX_URL is set,
  its mailboxes, tokens and subscriptions kept in .local/graph-sandbox/;
* development secrets (TOKEN_ENCRYPTION_KEYS, the SignalR AccessKey), made
  once and kept in .local/dev-secrets.json so restarts can read old data;

then the devhost on 7071, in this process, and ``--workers N`` more devhost
processes (``make run WORKERS=N``) that serve only the queue trigger of the
same app against the same queue and tables, as N more Function instances
would (the queue spreads the jobs over them; see docs/scaling.md). Ctrl-C
or SIGTERM (at any point, start-up included) stops the devhosts first
(in-flight queue messages are finished or returned) and then each service,
waiting for it to save its data: the search node flushes its shards,
Azurite writes its databases. A restart therefore shows every synced
message at once. ``--free-ports`` puts every service on a free port (tests,
or two stacks side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devhost import __main__ as devhost_main
from devhost.config import ConfigError, load_local_settings, merge_settings
from devhost.services.azurite import DEFAULT_QUEUE_PORT, DEFAULT_TABLE_PORT, start_azurite
from devhost.services.devhost_process import start_devhost
from devhost.services.graph_sandbox import start_graph_sandbox
from devhost.services.process import ROOT, ServiceError, free_port, port_open
from devhost.services.search_node import SearchNodeUnavailable, start_search_node
from devhost.services.search_store import start_search_store

SANDBOX_PORT = 7081
STORE_PORT = 9200


def _say(message: str) -> None:
    print(f"stack: {message}", flush=True)


def _dev_secrets(path: Path) -> dict[str, str]:
    """Secrets for local runs, generated once (never used outside this machine)."""
    if path.exists():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    secrets_doc = {
        "TOKEN_ENCRYPTION_KEYS": "dev1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "SIGNALR_ACCESS_KEY": secrets.token_urlsafe(32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(secrets_doc, handle)
    return secrets_doc


def _uses_development_storage(value: str | None) -> bool:
    return not value or value.replace(" ", "").lower().startswith("usedevelopmentstorage=true")


class Stack:
    """The services started for this run, stopped in reverse order."""

    def __init__(self) -> None:
        self.services: list[tuple[str, Any]] = []

    def add(self, name: str, service: Any) -> None:
        self.services.append((name, service))

    def stop(self) -> None:
        for name, service in reversed(self.services):
            try:
                service.stop()
                _say(f"stopped {name}")
            except Exception as exc:  # keep stopping the others
                _say(f"could not stop {name}: {exc}")
        self.services.clear()

    def watch(self, stop_event: threading.Event) -> None:
        """Warn once if a service dies while the devhost runs."""
        reported: set[str] = set()
        while not stop_event.wait(2.0):
            for name, service in self.services:
                if name not in reported and not service.alive():
                    reported.add(name)
                    _say(f"WARNING: {name} exited unexpectedly; the devhost will report it in /api/health")


def _start_search(data_dir: Path, logs: Path, stack: Stack, *, free_ports: bool) -> str:
    """The embedded OpenSearch node, or osmem where Java 17+/Maven are missing; returns its URL."""
    port = 0 if free_ports or port_open("127.0.0.1", STORE_PORT) else STORE_PORT
    try:
        node = start_search_node(data_dir / "search-node", port=port, log_path=logs / "search-node.log",
                                 own_session=True)
    except SearchNodeUnavailable as exc:
        _say(f"search store: {exc}, so osmem (in memory; mail is synced again after each restart) stands in")
        store = start_search_store(port=port, log_path=logs / "search-store.log", own_session=True)
        stack.add("search store", store)
        _say(f"search store (osmem, in memory) {store.url}")
        return store.url
    stack.add("search node", node)
    _say(f"search node (OpenSearch) {node.url} (data in {node.data})")
    return node.url


def start_services(env: dict[str, str], data_dir: Path, devhost_port: int, stack: Stack, *,
                   free_ports: bool = False) -> dict[str, str]:
    """Start what ``env`` does not configure; return the settings to add to the environment."""
    added: dict[str, str] = {}
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    if _uses_development_storage(env.get("AzureWebJobsStorage")):
        queue_port, table_port = (0, 0) if free_ports else (DEFAULT_QUEUE_PORT, DEFAULT_TABLE_PORT)
        for port in (queue_port, table_port):
            if port and port_open("127.0.0.1", port):
                raise ServiceError(f"port {port} is in use: is another `make run` (or Azurite) running? Stop it, "
                                   "or set AzureWebJobsStorage to use that one")
        azurite = start_azurite(data_dir / "azurite", queue_port=queue_port, table_port=table_port,
                                log_path=logs / "azurite.log", own_session=True)
        stack.add("Azurite", azurite)
        added["AzureWebJobsStorage"] = azurite.connection_string
        _say(f"Azurite queues http://127.0.0.1:{azurite.queue_port}, tables http://127.0.0.1:{azurite.table_port}"
             f" (data in {azurite.location})")
    else:
        _say("storage: using the configured AzureWebJobsStorage")

    if not env.get("ELASTICSEARCH_URL"):
        added["ELASTICSEARCH_URL"] = _start_search(data_dir, logs, stack, free_ports=free_ports)
        if not env.get("ELASTICSEARCH_REPLICAS"):
            # One node has nowhere to put a replica: the default (1) only leaves every new index yellow.
            added["ELASTICSEARCH_REPLICAS"] = "0"
    else:
        _say("search store: using the configured ELASTICSEARCH_URL")

    if not env.get("MS_CLIENT_ID") and not env.get("GRAPH_SANDBOX_URL"):
        try:
            sandbox_port = free_port() if free_ports else SANDBOX_PORT
            sandbox = start_graph_sandbox(logs / "graph-sandbox.log", port=sandbox_port, own_session=True,
                                          args=["--public-url", f"http://127.0.0.1:{sandbox_port}",
                                                # the devhost's webhook is http on loopback
                                                "--allow-http-loopback-webhooks",
                                                # linked accounts survive a restart of make run
                                                "--state-file", str(data_dir / "graph-sandbox" / "state.pickle")])
        except ServiceError as exc:
            _say(f"WARNING: Graph sandbox not started: {exc}")
        else:
            stack.add("Graph sandbox", sandbox)
            added["GRAPH_SANDBOX_URL"] = sandbox.url
            _say(f"Graph sandbox (Outlook is simulated) {sandbox.url}")
    elif env.get("MS_CLIENT_ID"):
        _say("Microsoft Graph: using the app registration MS_CLIENT_ID")

    dev = _dev_secrets(data_dir / "dev-secrets.json")
    if not env.get("TOKEN_ENCRYPTION_KEYS"):
        added["TOKEN_ENCRYPTION_KEYS"] = dev["TOKEN_ENCRYPTION_KEYS"]
    if not env.get("AzureSignalRConnectionString"):
        added["AzureSignalRConnectionString"] = (f"Endpoint=http://127.0.0.1:{devhost_port}/signalr;"
                                                 f"AccessKey={dev['SIGNALR_ACCESS_KEY']};Version=1.0;")
    return added


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devhost.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7071, help="devhost port (default 7071)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".local", help="where local data lives")
    parser.add_argument("--free-ports", action="store_true",
                        help="every service on a free port instead of 10001/10002/9200/7081")
    parser.add_argument("--workers", type=int, default=0,
                        help="extra devhost processes serving only the queue trigger (default 0)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must not be negative")
    return args


def start_workers(count: int, data_dir: Path, stack: Stack) -> None:
    """``count`` devhosts running only ``sync_worker``, with this process's settings (logs under data_dir/logs)."""
    env = dict(os.environ)
    for number in range(1, count + 1):
        worker = start_devhost(env, functions=["sync_worker"], log_dir=data_dir / "logs")
        stack.add(f"worker {number}", worker)
        _say(f"worker {number}: queue trigger only, pid {worker.pid}, log {worker.log_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    os.chdir(ROOT)
    settings_file = ROOT / "local.settings.json"
    if not settings_file.exists():
        settings_file = ROOT / "local.settings.sample.json"
        _say("no local.settings.json: using local.settings.sample.json (copy it to local.settings.json to change it)")
    try:
        local = load_local_settings(settings_file)
    except ConfigError as exc:
        _say(str(exc))
        return 2
    # Empty values in local.settings.json mean "not configured", as Settings reads them.
    env = {k: v for k, v in merge_settings(local, os.environ).items() if v != ""}
    stack = Stack()
    watch_stop = threading.Event()
    # Until the devhost installs its own handlers (and after it removes them), SIGTERM stops
    # the stack the way Ctrl-C does, so the `finally` below still stops every service cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            added = start_services(env, args.data_dir, args.port, stack, free_ports=args.free_ports)
        except ServiceError as exc:
            _say(f"cannot start: {exc}")
            return 1
        for key, value in local.items():
            if value != "":
                os.environ.setdefault(key, value)  # the environment wins, as with func start
        os.environ.update(added)
        os.environ.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{args.port}")
        try:
            start_workers(args.workers, args.data_dir, stack)
        except ServiceError as exc:
            _say(f"cannot start the workers: {exc}")
            return 1
        threading.Thread(target=stack.watch, args=(watch_stop,), daemon=True).start()

        def ready(base_url: str) -> None:
            _say(f"ready in {time.monotonic() - started:.1f} s")
            _say(f"  page    {base_url}/")
            _say(f"  API     {base_url}/api/   (health: {base_url}/api/health)")
            if os.environ.get("GRAPH_SANDBOX_URL"):
                _say(f"  sandbox {os.environ['GRAPH_SANDBOX_URL']}/  (the simulated Outlook mailboxes)")
            _say("Ctrl-C stops everything")

        devhost_args = devhost_main.parse_args(["--port", str(args.port), "--local-settings", ""])
        code = _run_devhost(devhost_args, ready)
    except KeyboardInterrupt:
        _say("stopping before the devhost started")
        code = 130
    finally:
        watch_stop.set()
        stack.stop()
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_devhost(args: argparse.Namespace, ready: Callable[[str], None]) -> int:
    try:
        return asyncio.run(devhost_main.serve(args, on_ready=ready))
    except Exception as exc:
        _say(f"devhost failed: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # A function thread that never returns must not keep the process alive.
    os._exit(code)
