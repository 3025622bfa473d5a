"""What every benchmark needs: the local stack, linked accounts, process watching, figures.

The scripts under ``bench/`` import this module and never repeat it:

* :class:`Stack` starts Azurite, the embedded search node (OpenSearch), the Graph sandbox (a child
  process, so its CPU is not ours) and a devhost running the whole
  function app — all on 127.0.0.1, free ports, data in a temp folder —
  and stops them again. ``stack.add_worker()`` starts another devhost
  that only runs the queue trigger (more workers, or workers to kill).
* :meth:`Stack.link` links a sandbox user the way the page does: ``POST
  /api/accounts``, the sandbox's sign-in form, the OAuth callback.
* :class:`Sandbox` talks to the sandbox's admin API (counters, faults,
  snapshots) and to Graph as a user (delegated tokens).
* :func:`fetch_mailbox` pages every folder's delta through the product's
  own Graph provider, so benchmarks hold exactly the ``Message`` records
  the engine writes; :func:`store_ceiling` bulk-loads them straight into
  the store (no engine) to measure what the store alone can take.
* :class:`ProcessWatch` samples RSS and reads peak RSS (VmHWM) and CPU time
  of child processes from /proc; :func:`compare` says how the store
  differs from the sandbox's ground truth.
* :func:`figures` formats the final ``key=value`` line every script prints.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from devhost.os_threads import stat_cpu_s  # noqa: E402
from devhost.services.azurite import Azurite, start_azurite  # noqa: E402
from devhost.services.devhost_process import DevhostProcess, start_devhost  # noqa: E402
from devhost.services.graph_sandbox import GraphSandbox, start_graph_sandbox  # noqa: E402
from devhost.services.process import free_port  # noqa: E402
from devhost.services.search_node import SearchNode, start_search_node  # noqa: E402
from devhost.services.signalr_service import SignalRServiceProcess, start_signalr_service  # noqa: E402
from mailsync.models import Folder, Message, MessageQuery  # noqa: E402
from mailsync.providers.graph import GraphProvider  # noqa: E402
from mailsync.providers.graph_client import GraphClient  # noqa: E402
from mailsync.settings import Settings  # noqa: E402
from mailsync.store.engines import connect  # noqa: E402
from mailsync.store.mappings import IndexNames  # noqa: E402
from mailsync.store.search_store import SearchStore, StoreOptions  # noqa: E402

_T0 = time.monotonic()
MAIL_SCOPES = "Mail.ReadWrite Mail.Send User.Read offline_access openid profile"


def say(message: str) -> None:
    """A progress line, stamped with seconds since the script started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def figures(name: str, values: dict[str, Any]) -> str:
    """The final ``name key=value ...`` line (floats rounded, no spaces in values)."""
    parts = [name]
    for key, value in values.items():
        text = (f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}") if isinstance(value, float) else str(value)
        parts.append(f"{key}={text.replace(' ', '_')}")
    return " ".join(parts)


# --- processes ----------------------------------------------------------------------------

def _proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_mb(pid: int) -> float | None:
    kb = _proc_status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb(pid: int) -> float | None:
    """The process's high-water mark of resident memory (VmHWM), while it lives."""
    kb = _proc_status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process."""
    return stat_cpu_s(f"/proc/{pid}/stat")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and every descendant, live or exited and reaped (utime+stime+cutime+cstime).

    For servers that fork a process per connection (Dovecot): a child that
    logged out and was reaped is in its parent's cutime, a live one is read
    itself, so the sum is what the whole tree has spent so far.
    """
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        times[child] = sum(int(f) for f in fields[11:15]) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total


class BackgroundLoop:
    """A benchmark's helper thread: ``start()``, then ``stop()`` sets ``_stop`` and waits for ``_run`` to return."""

    thread_name = "bench-loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class ProcessWatch:
    """Samples the RSS of named processes every ``interval_s``; remembers peaks after they die."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._pids: dict[str, int] = {}
        self.peak_mb: dict[str, float] = {}
        self.last_cpu_s: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._pids[name] = pid

    def forget(self, name: str) -> None:
        self._sample_one(name)
        with self._lock:
            self._pids.pop(name, None)

    def _sample_one(self, name: str) -> None:
        pid = self._pids.get(name)
        if pid is None:
            return
        seen = [v for v in (rss_mb(pid), peak_rss_mb(pid)) if v is not None]
        if seen:
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), *seen)
        used = cpu_s(pid)
        if used is not None:
            self.last_cpu_s[name] = used

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                names = list(self._pids)
            for name in names:
                self._sample_one(name)

    def stop(self) -> None:
        with self._lock:
            names = list(self._pids)
        for name in names:
            self._sample_one(name)
        self._stop.set()
        self._thread.join()


# --- the sandbox --------------------------------------------------------------------------

class Sandbox:
    """The Graph sandbox's admin API and Graph as its users (delegated tokens, cached)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._tokens: dict[str, str] = {}
        self._http = requests.Session()

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 120)
        answer = self._http.request(method, f"{self.url}/sandbox/{path.lstrip('/')}", **kwargs)
        if answer.status_code >= 400:
            raise RuntimeError(f"sandbox {method} {path}: {answer.status_code} {answer.text[:300]}")
        return answer.json()

    def counters(self) -> dict[str, Any]:
        return dict(self.admin("GET", "counters"))

    def requests_served(self) -> int:
        return int(self.counters()["requests"])

    def reset_counters(self) -> None:
        self.admin("POST", "counters/reset")

    def configure(self, **settings: Any) -> dict[str, Any]:
        return dict(self.admin("PATCH", "config", json=settings))

    def faults(self, profile: str, *, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        return dict(self.admin("PUT", "faults", json={"profile": profile, "seed": seed, "overrides": overrides}))

    def users(self) -> list[dict[str, Any]]:
        return list(self.admin("GET", "users")["users"])

    def snapshot(self, user: str) -> dict[str, Any]:
        return dict(self.admin("GET", f"mailboxes/{user}/snapshot"))

    def token(self, address: str) -> str:
        if address not in self._tokens:
            from tests.graph_sandbox.signin import user_tokens  # the sandbox's PKCE sign-in, shared with tests

            answer, _ = user_tokens(self.url, address, scope=MAIL_SCOPES)
            self._tokens[address] = str(answer["access_token"])
        return self._tokens[address]

    def graph(self, address: str) -> GraphUser:
        return GraphUser(self.url, self.token(address))


class GraphUser(requests.Session):
    """Graph as one user: paths relative to ``/v1.0/``, immutable ids."""

    def __init__(self, base_url: str, token: str) -> None:
        super().__init__()
        self.base_url = base_url
        self.headers["Authorization"] = f"Bearer {token}"
        self.headers["Prefer"] = 'IdType="ImmutableId"'

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        text = url.decode() if isinstance(url, bytes) else url
        if not text.startswith("http"):
            text = f"{self.base_url}/v1.0/{text.lstrip('/')}"
        kwargs.setdefault("timeout", 60)
        return super().request(method, text, *args, **kwargs)


# --- the stack ----------------------------------------------------------------------------

@dataclass
class Linked:
    """A linked account: its id, the page's bearer token, the sandbox user, and when each step of its
    sign-in began and ended (monotonic): ``POST /api/accounts`` from ``started``, the sandbox's sign-in
    form until ``callback_started``, the OAuth callback until ``callback_done``."""

    account_id: str
    token: str
    address: str
    callback_started: float
    callback_done: float
    started: float = 0.0
    form_started: float = 0.0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Stack:
    """Azurite + the search node + Graph sandbox + devhost(s), on loopback, in ``workdir``."""

    workdir: Path
    azurite: Azurite
    search: SearchNode
    sandbox_process: GraphSandbox
    sandbox: Sandbox
    env: dict[str, str]
    host: DevhostProcess | None = None
    workers: list[DevhostProcess] = field(default_factory=list)
    watch: ProcessWatch = field(default_factory=ProcessWatch)
    script_root: Path = ROOT          # where the devhosts read host.json (see with_queue_options)
    in_process: Any = None            # a DevhostThread when the app runs in this process
    storage_counter: StorageCounter | None = None
    signalr: SignalRServiceProcess | None = None   # the SignalR Service stand-in, a process of its own
    base_url: str = ""
    _http: requests.Session = field(default_factory=requests.Session)

    @property
    def api(self) -> str:
        return f"{self.base_url}/api"

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def store(self, prefix: str | None = None) -> SearchStore:
        """A store client on the stack's search store (the app's index prefix unless told)."""
        settings = self.settings
        return SearchStore(connect(self.search.url, request_timeout_s=120),
                           StoreOptions(prefix=prefix or settings.index_prefix,
                                        replicas=settings.elasticsearch_replicas))

    def start_host(self, functions: list[str] | None = None) -> DevhostProcess:
        port = int(self.env["PUBLIC_BASE_URL"].rsplit(":", 1)[1])
        self.host = start_devhost(self.env, port=port, functions=functions, log_dir=self.workdir,
                                  script_root=self.script_root)
        self.watch.watch("devhost", self.host.pid)
        self.base_url = self.host.base_url
        return self.host

    def with_queue_options(self, **queue_options: Any) -> None:
        """Run the devhosts with host.json ``extensions.queues`` changed (an experiment, e.g.
        ``maxPollingInterval="00:00:00.500"``): a script root of links to this checkout plus the changed
        host.json."""
        import json

        root = self.workdir / "script-root"
        root.mkdir(exist_ok=True)
        for name in ("function_app.py", "functions", "mailsync", "devhost", "static_web"):
            link = root / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        config = json.loads((ROOT / "host.json").read_text())
        config.setdefault("extensions", {}).setdefault("queues", {}).update(queue_options)
        (root / "host.json").write_text(json.dumps(config, indent=2))
        self.script_root = root

    def queue_depth(self) -> int:
        """Messages on the sync queue, visible or not (read directly from Azurite: not counted)."""
        from azure.storage.queue import QueueClient

        client = QueueClient.from_connection_string(self.azurite.connection_string, self.env["SYNC_QUEUE_NAME"])
        try:
            return int(client.get_queue_properties().approximate_message_count or 0)
        except Exception:
            return 0
        finally:
            client.close()

    def wait_quiet(self, timeout_s: float = 300, looks: int = 3) -> float:
        """Wait until the sync queue is empty ``looks`` times in a row, a second apart; returns seconds waited."""
        started = time.monotonic()
        quiet = 0
        while quiet < looks and time.monotonic() - started < timeout_s:
            quiet = quiet + 1 if self.queue_depth() == 0 else 0
            time.sleep(1)
        return time.monotonic() - started

    def start_host_in_process(self) -> str:
        """Host the whole function app in *this* process (to profile it and count its CPU).

        The app reads its settings from os.environ (``Settings.from_env()``),
        so the stack's settings are put there first.
        """
        from devhost.config import load_host_config
        from devhost.host import Devhost, DevhostOptions, DevhostThread
        from devhost.index import load_app
        from mailsync.logs import configure_logging

        os.environ.update(self.env)
        configure_logging("json")
        log_file = (self.workdir / "app.log").open("a", encoding="utf-8")   # not the console: one line per page
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_mailsync", False) and isinstance(handler, logging.StreamHandler):
                handler.setStream(log_file)
        app = load_app("function_app:app")
        port = int(self.env["PUBLIC_BASE_URL"].rsplit(":", 1)[1])
        devhost = Devhost(app, dict(os.environ), load_host_config(self.script_root / "host.json"),
                          DevhostOptions(function_directory=str(ROOT)))
        self.in_process = DevhostThread(devhost)
        self.base_url = self.in_process.start("127.0.0.1", port)
        return self.base_url

    def add_worker(self, queue_lease_s: float | None = None) -> DevhostProcess:
        """Another devhost running only the queue trigger (same queue, same tables)."""
        extra = ["--queue-lease-s", str(queue_lease_s)] if queue_lease_s else None
        worker = start_devhost(self.env, functions=["sync_worker"], log_dir=self.workdir, extra_args=extra,
                               script_root=self.script_root)
        self.workers.append(worker)
        self.watch.watch(f"worker{worker.pid}", worker.pid)
        return worker

    def kill_worker(self, worker: DevhostProcess) -> None:
        """SIGKILL: the worker dies mid-whatever, as a crashed instance would."""
        self.watch.forget(f"worker{worker.pid}")
        worker.kill()
        self.workers.remove(worker)

    def stop_and_clean(self, *, keep: bool) -> None:
        """``stop``, then the work folder (data, logs, profiles) goes unless ``keep`` (a benchmark's ``--keep``)."""
        self.stop()
        if not keep:
            remove_workdir(self.workdir)

    def stop(self) -> None:
        self.watch.stop()
        for worker in list(self.workers):
            with contextlib.suppress(Exception):
                worker.stop(timeout_s=10)
        if self.host is not None:
            with contextlib.suppress(Exception):
                self.host.stop(timeout_s=15)
        if self.in_process is not None:
            with contextlib.suppress(Exception):
                self.in_process.stop(10)
        if self.storage_counter is not None:
            self.storage_counter.stop()
        for service in (self.signalr, self.sandbox_process, self.search, self.azurite):
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the page's side ---

    def link(self, address: str) -> Linked:
        """Link ``address`` as the page does; returns when the OAuth callback has answered.

        Each sign-in is its own browser (its own cookie jar): the callback only
        completes in the browser that started the sign-in (its sign-in cookie),
        and benchmarks link several accounts at once.
        """
        with requests.Session() as browser:
            return self._link(browser, address)

    def _link(self, browser: requests.Session, address: str) -> Linked:
        started = time.monotonic()
        created = browser.post(f"{self.api}/accounts", json={"provider": "outlook"}, timeout=60)
        if created.status_code != 201:
            raise RuntimeError(f"POST /api/accounts: {created.status_code} {created.text[:300]}")
        body = created.json()
        form_started = time.monotonic()
        form = browser.post(body["authorize_url"], data={"username": address}, allow_redirects=False, timeout=60)
        if form.status_code != 302:
            raise RuntimeError(f"sandbox sign-in: {form.status_code} {form.text[:300]}")
        callback_started = time.monotonic()
        callback = browser.get(form.headers["Location"], allow_redirects=False, timeout=120)
        done = time.monotonic()
        if callback.status_code != 302 or "error" in callback.headers.get("Location", ""):
            raise RuntimeError(f"OAuth callback: {callback.status_code} {callback.headers.get('Location')} "
                               f"{callback.text[:300]}")
        return Linked(body["account_id"], body["access_token"], address, callback_started=callback_started,
                      callback_done=done, started=started, form_started=form_started)

    def account(self, linked: Linked) -> dict[str, Any]:
        answer = self._http.get(f"{self.api}/accounts/{linked.account_id}", headers=linked.auth, timeout=60)
        answer.raise_for_status()
        return dict(answer.json())

    def messages(self, linked: Linked, **params: Any) -> list[dict[str, Any]]:
        answer = self._http.get(f"{self.api}/accounts/{linked.account_id}/messages", headers=linked.auth,
                                params=params, timeout=60)
        if answer.status_code != 200:
            return []
        return list(answer.json().get("messages", []))

    def wait_status(self, linked: Linked, wanted: str, *, timeout_s: float, interval_s: float = 0.25,
                    on_poll: Callable[[dict[str, Any]], None] | None = None) -> float:
        """Poll the account until its status is ``wanted``; returns monotonic time it was seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.account(linked)
            if on_poll is not None:
                on_poll(view)
            if view.get("status") == wanted:
                return time.monotonic()
            if view.get("status") in ("reauth_required", "error"):
                raise RuntimeError(f"account became {view.get('status')}: {view.get('error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"account not {wanted} after {timeout_s:g} s: {view}")
            time.sleep(interval_s)


def link_many(stack: Stack, addresses: Sequence[str], parallel: int) -> list[Linked]:
    """Link every address, ``parallel`` sign-ins at a time, in order; a failed sign-in is retried whole
    (on a busy machine the callback can time out)."""
    started = time.monotonic()
    done: list[Linked] = []

    def one(address: str) -> Linked:
        for attempt in range(5):
            try:
                return stack.link(address)
            except Exception as exc:
                if attempt == 4:
                    raise
                say(f"  link {address} failed ({exc}); retrying")
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(parallel) as pool:
        for linked in pool.map(one, addresses):
            done.append(linked)
            if len(done) % 50 == 0:
                say(f"  linked {len(done)}/{len(addresses)} ({time.monotonic() - started:.0f} s)")
    return done


def record_store_generation(stack: Stack) -> str:
    """Do what a deployment's first poll tick does, before the run: record the store's generation
    (``mailsync.monitoring.store_watch``). Otherwise the stack's first tick, a minute in, finds none
    recorded and gives every account linked so far one more sync (cheap on a real deployment, which
    ticked long before its accounts came; in a benchmark, an extra job per account in its window)."""
    from azure.core.exceptions import ResourceExistsError
    from azure.data.tables import TableClient

    from mailsync.storage.store_generation import TableGenerationLedger

    generation = stack.store().generation()
    table = TableClient.from_connection_string(stack.azurite.connection_string, f"{stack.env['TABLE_PREFIX']}sync")
    with contextlib.suppress(ResourceExistsError):     # the app made it
        table.create_table()
    try:
        TableGenerationLedger(table).record(generation)
    finally:
        table.close()
    return generation


def wait_synced(stack: Stack, account_ids: set[str], timeout_s: float, *, poll_s: float = 1.0) -> None:
    """Until every account is ``synced``, read from Azurite's accounts table directly: polling the app's
    views (or the counting proxy) for 1,000 accounts would itself load the host that syncs them."""
    from azure.data.tables import TableClient

    table = TableClient.from_connection_string(stack.azurite.connection_string,
                                               f"{stack.env['TABLE_PREFIX']}accounts")
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while True:
            synced = {str(e["PartitionKey"]) for e in table.query_entities(
                "RowKey eq 'account' and status eq 'synced'", select=["PartitionKey"])} & account_ids
            if len(synced) == len(account_ids):
                return
            if time.monotonic() - last > 15:
                last = time.monotonic()
                say(f"  {len(synced)}/{len(account_ids)} synced")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(account_ids) - len(synced)} account(s) not synced after {timeout_s:g} s")
            time.sleep(poll_s)
    finally:
        table.close()


def start_stack(name: str, *, users: int = 1, messages: int = 1000, latency_ms: int = 0, seed: int = 42,
                sandbox_args: Sequence[str] = (), env: dict[str, str] | None = None,
                functions: list[str] | None = None, start_host: bool = True,
                workdir: Path | None = None, count_storage: bool = False) -> Stack:
    """Start everything a benchmark needs; ``stack.stop()`` (or ``with``) stops it.

    ``count_storage`` puts a :class:`StorageCounter` between the app and
    Azurite (``stack.storage_counter``). ``env`` adds or overrides app
    settings (e.g. GRAPH_PAGE_SIZE). The
    sandbox's own rate limit is lifted (the per-mailbox concurrency limit of
    4 stays): benchmarks measure the engine, not the sandbox's window.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"starting Azurite, the search node and the Graph sandbox ({users} user(s) x {messages} messages) in "
        f"{workdir}")
    azurite = start_azurite(workdir / "azurite")
    search: SearchNode | None = None
    sandbox_process: GraphSandbox | None = None
    signalr: SignalRServiceProcess | None = None
    try:
        search = start_search_node(workdir / "search-node")
        sandbox_process = start_graph_sandbox(
            workdir / "graph-sandbox.log", timeout_s=600,
            args=["--seed", str(seed), "--users", str(users), "--messages-per-user", str(messages),
                  "--latency-ms", str(latency_ms), "--rate-limit", "1000000000/600",
                  "--allow-http-loopback-webhooks", *sandbox_args])
        port = free_port()
        # Its own process, as Azure SignalR Service is not the Function App's: its CPU is counted apart.
        signalr = start_signalr_service(workdir / "signalr-service.log", secrets.token_urlsafe(32))
        counter = StorageCounter(azurite) if count_storage else None
        app_env = {
            "AzureWebJobsStorage": counter.connection_string if counter else azurite.connection_string,
            "SYNC_QUEUE_NAME": f"bench{uuid.uuid4().hex[:8]}",
            "TABLE_PREFIX": f"b{uuid.uuid4().hex[:8]}",
            "ELASTICSEARCH_URL": search.url,
            "ELASTICSEARCH_INDEX_PREFIX": f"b{uuid.uuid4().hex[:8]}",
            "ELASTICSEARCH_REPLICAS": "0",   # the embedded single node has nowhere to put one
            "GRAPH_SANDBOX_URL": sandbox_process.url,
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "TOKEN_ENCRYPTION_KEYS": "bench1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
            "MAILSYNC_LOCAL_DIR": str(workdir / "local"),
            # Every bench account comes from 127.0.0.1: the per-client limits would stop a large run.
            "RATE_LIMIT_NEW_ACCOUNTS": "0",
            "RATE_LIMIT_IMAP_ATTEMPTS": "0",
            "LINKED_ACCOUNTS_PER_CLIENT_PER_DAY": "0",
            "SIGNALR_HUB": "mailsync",
            "AzureSignalRConnectionString": signalr.connection_string,
        }
        app_env.update(env or {})
        stack = Stack(workdir, azurite, search, sandbox_process, Sandbox(sandbox_process.url), app_env,
                      storage_counter=counter, signalr=signalr)
    except BaseException:
        for service in (signalr, sandbox_process, search, azurite):
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()
        raise
    stack.watch.watch("sandbox", sandbox_process.process.pid)
    stack.watch.watch("search-node", search.process.pid)
    stack.watch.watch("signalr-service", signalr.process.pid)
    if start_host:
        try:
            stack.start_host(functions)
        except BaseException:
            stack.stop()
            raise
    say(f"stack up: devhost {stack.base_url or '-'}, sandbox {sandbox_process.url}, "
        f"store {search.url}")
    return stack


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- the mailbox as the engine sees it, and the store alone ---------------------------------

@dataclass
class Mailbox:
    """Every folder and message of a mailbox as the Graph provider maps them."""

    folders: list[Folder]
    messages: list[Message]
    pages: dict[str, int]          # folder id -> delta pages at the page size used

    @property
    def total_pages(self) -> int:
        return sum(self.pages.values())


def fetch_mailbox(sandbox: Sandbox, address: str, settings: Settings, *, page_size: int = 500,
                  account_id: str = "bench-ceiling") -> Mailbox:
    """Page every folder's delta once, through the product's Graph provider (no store, no engine)."""
    token = sandbox.token(address)
    client = GraphClient(lambda _force: token, base_url=f"{sandbox.url}/v1.0")
    provider = GraphProvider(client, account_id, page_size=page_size, store_body_text=settings.store_body_text,
                             body_text_max_chars=settings.body_text_max_chars)
    try:
        # By id: the first round lists the well-known folders twice (in the delta, and
        # again with the roles the provider looks up), and their mail was counted twice.
        by_id: dict[str, Folder] = {}
        cursor: str | None = None
        while True:
            batch = provider.folder_changes(cursor)
            by_id.update((folder.folder_id, folder) for folder in batch.upserts)
            cursor = batch.cursor
            if batch.complete:
                break
        folders = list(by_id.values())
        messages: list[Message] = []
        pages: dict[str, int] = {}
        for folder in folders:
            cursor, count = None, 0
            while True:
                page = provider.message_changes(folder.folder_id, cursor)
                count += 1
                messages.extend(page.upserts)
                cursor = page.cursor
                if page.complete:
                    break
            pages[folder.folder_id] = count
        return Mailbox(folders, messages, pages)
    finally:
        provider.close()


@dataclass
class StoreCeiling:
    best_chunk: int
    docs_per_s: float
    elapsed_s: float
    sample_rates: dict[str, float]
    source_bytes_per_msg: float = 0.0     # the JSON documents as sent (the store's _source)
    writers: int = 1


def source_bytes_per_message(messages: Sequence[Message], sample: int = 5000) -> float:
    """Average size of the store's JSON document for these messages (what ``_source`` keeps)."""
    import orjson

    from mailsync.store.documents import BodyPolicy, message_to_document

    chosen = messages[:: max(1, len(messages) // sample)] if messages else []
    if not chosen:
        return 0.0
    policy = BodyPolicy()
    total = sum(len(orjson.dumps(message_to_document(m, epoch=1, body=policy))) for m in chosen)
    return total / len(chosen)


def _load(store: SearchStore, messages: Sequence[Message], batch: int, streams: int = 1) -> float:
    """Bulk-load ``messages`` in ``streams`` parallel writers (contiguous slices); wall seconds."""
    def one(part: Sequence[Message]) -> None:
        for start in range(0, len(part), batch):
            result = store.upsert_messages(part[start:start + batch], epoch=1)
            if result.failed_ids:
                raise RuntimeError(f"store refused {len(result.failed_ids)} message(s) in the ceiling run")

    started = time.perf_counter()
    # Under a bulk load, as the engine writes a folder's first round: the same relaxed refresh.
    with store.bulk_load("ceiling"):
        if streams <= 1:
            one(messages)
        else:
            from concurrent.futures import ThreadPoolExecutor

            size = -(-len(messages) // streams)
            with ThreadPoolExecutor(streams) as pool:
                list(pool.map(one, [messages[i:i + size] for i in range(0, len(messages), size)]))
    return time.perf_counter() - started


def store_ceiling(search_url: str, messages: Sequence[Message], *, chunks: Iterable[int] = (1000, 2000),
                  streams: Iterable[int] = (1, 4), sample: int = 3000) -> StoreCeiling:
    """The store alone: bulk-load ``messages`` at its best chunk size and parallelism, no engine in between.

    Each candidate (chunk size, parallel writers) loads the first
    ``sample`` messages into a fresh index; the best one then loads them
    all into another fresh index, timed. That time is the store's bound for
    these documents. Parallel writers are tried because the engine writes
    up to 4 folders at once and a store may index them on several cores;
    a bound measured with one writer would flatter the engine. Each load
    runs inside ``bulk_load`` (the relaxed refresh the engine's first rounds
    use), and its time includes the refresh at its end. The indices are
    deleted afterwards.
    """
    rates: dict[tuple[int, int], float] = {}
    candidates = [(c, w) for c in chunks for w in streams]
    sample_set = messages[: min(sample, len(messages))]
    with _scratch_store(search_url, candidates[0][0]) as store:
        _load(store, messages[:500], 500)   # warm-up: the first bulk of a fresh server is slower
    if len(candidates) > 1 and sample_set:
        for chunk, writers in candidates:
            with _scratch_store(search_url, chunk) as store:
                rates[(chunk, writers)] = len(sample_set) / _load(store, sample_set, max(chunk, 2000), writers)
            say(f"  store sample: chunk {chunk}, {writers} writer(s): {rates[(chunk, writers)]:,.0f} docs/s")
        best = max(rates, key=rates.__getitem__)
    else:
        best = candidates[0]
    with _scratch_store(search_url, best[0]) as store:
        elapsed = _load(store, messages, max(best[0], 2000), best[1])
    return StoreCeiling(best[0], len(messages) / elapsed if elapsed else 0.0, elapsed,
                        {f"{c}x{w}": r for (c, w), r in rates.items()}, source_bytes_per_message(messages),
                        writers=best[1])


@contextlib.contextmanager
def _scratch_store(search_url: str, chunk: int) -> Iterator[SearchStore]:
    prefix = f"ceil{uuid.uuid4().hex[:8]}"
    store = SearchStore(connect(search_url, request_timeout_s=300),
                        StoreOptions(prefix=prefix, chunk_docs=chunk, replicas=0))
    store.ensure_ready()
    try:
        yield store
    finally:
        names = IndexNames(prefix)
        with contextlib.suppress(Exception):
            store.engine.delete_indices(names.physical_indices)
        store.close()


def graph_bound_s(total_pages: int, latency_ms: float, concurrency: int = 4) -> float:
    """Graph's limit: at most ``concurrency`` requests in flight per mailbox, each ``latency``."""
    return math.ceil(total_pages / concurrency) * latency_ms / 1000


# --- store versus sandbox -------------------------------------------------------------------

@dataclass(frozen=True)
class Diff:
    missing: list[str]
    extra: list[str]
    stale: list[tuple[str, tuple[Any, ...], tuple[Any, ...]]]
    folders_missing: list[str]
    folders_extra: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.stale or self.folders_missing or self.folders_extra)

    def summary(self) -> str:
        return (f"missing={len(self.missing)} extra={len(self.extra)} stale={len(self.stale)} "
                f"folders_missing={len(self.folders_missing)} folders_extra={len(self.folders_extra)}")


def _key(folder_id: str, subject: str, is_read: bool, flag: str, categories: Iterable[str], importance: str,
         sender: str, modified_s: int) -> tuple[Any, ...]:
    return (folder_id, subject, is_read, flag, tuple(sorted(categories)), importance, sender, modified_s)


def compare(store: SearchStore, account_id: str, snapshot: dict[str, Any]) -> Diff:
    """How the store's copy of an account differs from the sandbox's snapshot of the mailbox.

    A message is *stale* when any field the list shows differs (folder,
    subject, read, flag, categories, importance, sender, last modified to
    the second).
    """
    truth: dict[str, tuple[Any, ...]] = {}
    for m in snapshot["messages"]:
        modified = int(datetime.fromisoformat(m["lastModifiedDateTime"].replace("Z", "+00:00")).timestamp())
        truth[m["id"]] = _key(m["folderId"], m["subject"], m["isRead"], m["flagStatus"], m["categories"],
                              m["importance"], (m["from"] or {}).get("address", ""), modified)
    store.refresh()
    stored: dict[str, tuple[Any, ...]] = {}
    cursor: str | None = None
    while True:
        page = store.list_messages(account_id, MessageQuery(limit=500, cursor=cursor))
        for m in page.messages:
            stored[m.message_id] = _key(m.folder_id, m.subject, m.is_read, m.flag_status.value, m.categories,
                                        m.importance, m.sender.address if m.sender else "", m.version // 1000)
        cursor = page.next_cursor
        if cursor is None:
            break
    true_folders = {f["id"] for f in snapshot["folders"]}
    stored_folders = {v.folder.folder_id for v in store.list_folders(account_id)}
    return Diff(
        missing=sorted(set(truth) - set(stored)),
        extra=sorted(set(stored) - set(truth)),
        stale=[(mid, stored[mid], truth[mid]) for mid in sorted(truth) if mid in stored and stored[mid] != truth[mid]],
        folders_missing=sorted(true_folders - stored_folders),
        folders_extra=sorted(stored_folders - true_folders),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --- storage transactions (billed per 10,000) -------------------------------------------------

class StorageCounter:
    """A counting reverse proxy in front of Azurite's queue and table endpoints.

    Azure bills queue and table *transactions*; this counts every request
    the app makes, by service and operation, without changing them (Shared
    Key signatures cover the path, not the host, so they stay valid).
    """

    def __init__(self, azurite: Azurite) -> None:
        import asyncio

        self.azurite = azurite
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-storage-proxy", daemon=True)
        self._thread.start()
        self.queue_port, self.table_port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    @property
    def connection_string(self) -> str:
        from devhost.services.azurite import connection_string

        return connection_string("127.0.0.1", self.queue_port, self.table_port)

    async def _start(self) -> tuple[int, int]:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              connector=aiohttp.TCPConnector(limit=0))
        ports = []
        self._runners = []
        for service, target in (("queue", self.azurite.queue_port), ("table", self.azurite.table_port)):
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._forwarder(service, target))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            ports.append(runner.addresses[0][1])
        return ports[0], ports[1]

    def _forwarder(self, service: str, target: int) -> Any:
        import yarl
        from aiohttp import web

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            self.count(service, request.method, request.path)
            if service == "table":
                self.count_rows(request.method, request.path, request.query_string, body)
            # Exactly the signed headers: no Host rewrite beyond the port, nothing added by aiohttp.
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "transfer-encoding")}
            # encoded=True: the path goes out byte for byte (the signature covers it; yarl would re-quote).
            url = yarl.URL(f"http://127.0.0.1:{target}{request.raw_path}", encoded=True)
            async with self._session.request(request.method, url,
                                             headers=headers, data=body,
                                             skip_auto_headers=("Content-Type", "User-Agent", "Accept",
                                                                "Accept-Encoding")) as answer:
                payload = await answer.read()
                out = {k: v for k, v in answer.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection")}
                return web.Response(status=answer.status, headers=out, body=payload)

        return forward

    def count(self, service: str, method: str, path: str) -> None:
        if service == "queue":
            messages = "/messages" in path
            what = {"GET": "receive", "POST": "send", "DELETE": "delete", "PUT": "update"}.get(method, method) \
                if messages else f"admin_{method.lower()}"
        elif path.endswith("$batch"):
            what = "batch"
        elif path.rstrip("/").endswith("/Tables") or "/Tables(" in path:
            what = f"admin_{method.lower()}"
        else:
            what = {"GET": "query", "POST": "insert", "PUT": "update", "MERGE": "update", "PATCH": "update",
                    "DELETE": "delete"}.get(method, method.lower())
        key = f"{service}_{what}"
        # Also by table / queue (the prefix the benchmark gave them cut off): which one an idle stack polls.
        parts = path.split("/")
        target = parts[2].split("(")[0] if len(parts) > 2 else ""
        where = f"{service}@{target[9:] if service == 'table' else target[13:] or 'sync'}_{what}"
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.counts[where] = self.counts.get(where, 0) + 1
            self.counts[f"{service}_total"] = self.counts.get(f"{service}_total", 0) + 1

    def count_rows(self, method: str, path: str, query: str, body: bytes) -> None:
        """Also count table calls by the kind of row they touch (``rows@<table>_<op>:<kinds>``).

        Which step of the change path a call belongs to shows in its rows: the
        webhook's ``pending`` row, the mailbox's ``slot`` rows, a ``folder``
        row (lease, cursor, look-again claim), the ``folders`` (folder-list)
        row, a whole ``partition`` query, an ``account`` row. A batch lists
        every kind it writes (slot + lease in one transaction: ``folder+slot``).
        """
        parts = path.split("/")
        target = parts[2].split("(")[0] if len(parts) > 2 else ""
        if target.rstrip("/").endswith("Tables") or not target:
            return
        if path.endswith("$batch"):
            text = body.decode("utf-8", errors="replace")
            keys = _ROW_KEY_IN_PATH.findall(urllib.parse.unquote(text)) + _ROW_KEY_IN_JSON.findall(text)
            what = "batch"
        else:
            keys = _ROW_KEY_IN_PATH.findall(urllib.parse.unquote(path))
            if not keys and method == "POST":   # an insert names its row in the body
                keys = _ROW_KEY_IN_JSON.findall(body.decode("utf-8", errors="replace"))
            what = {"GET": "query" if not keys else "get", "POST": "insert", "PUT": "update", "MERGE": "update",
                    "PATCH": "update", "DELETE": "delete"}.get(method, method.lower())
            if not keys:
                keys = ["partition" if "PartitionKey" in urllib.parse.unquote(query) else "scan"]
        kinds = "+".join(sorted({_row_kind(key) for key in keys})) or "?"
        table = "" if what == "batch" else target[9:]   # a batch's path names no table
        key = f"rows@{table}_{what}:{kinds}"
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def stop(self) -> None:
        import asyncio

        async def shut() -> None:
            await self._session.close()
            for runner in self._runners:
                await runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)


_ROW_KEY_IN_PATH = re.compile(r"RowKey='([^']*)'")
_ROW_KEY_IN_JSON = re.compile(r'"RowKey":\s*"([^"]*)"')


def _row_kind(key: str) -> str:
    """A row's kind from its RowKey (the sync table's ``f:<id>`` and ``slot:<n>``, else the key itself)."""
    if key in ("partition", "scan"):
        return key
    if key.startswith("f:"):
        return "folder"
    if key.startswith("slot:"):
        return "slot"
    return key if len(key) <= 24 else "other"


def diff_counts(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            if after.get(k, 0) - before.get(k, 0)}


# --- where the time goes ---------------------------------------------------------------------

_NETWORK = ("/socket.py", "/ssl.py", "/http/client.py", "/urllib3/", "/elastic_transport/", "/requests/",
            "/azure/core/pipeline/transport/")
_IDLE = ("/threading.py", "/queue.py", "/concurrent/futures/thread.py", "/selectors.py")


class StackSampler(BackgroundLoop):
    """A sampling profiler (like py-spy, in-process): what chosen threads are doing, 100 times a second.

    Each sample of a thread is put in a bucket named after the deepest
    project module on its stack (``mailsync.store.search_store``,
    ``mailsync.providers.graph``...) and what the leaf frame is doing:
    ``network`` (waiting on a socket: the store, Graph, Tables, the
    queue), ``idle`` (waiting on a lock or queue: no work) or ``python``
    (running our code or a library's). Counts are wall-clock shares of
    the sampled threads, not CPU; C calls (orjson) count to the Python
    frame that made them.
    """

    thread_name = "bench-sampler"

    def __init__(self, prefixes: tuple[str, ...] = ("devhost-fn", "mailsync-page-reader"),
                 interval_s: float = 0.01) -> None:
        self.prefixes = prefixes
        self.interval_s = interval_s
        self.buckets: dict[str, int] = {}
        self.leaves: dict[str, int] = {}
        self.samples = 0
        self.cpu_s = 0.0
        super().__init__()

    def _run(self) -> None:
        try:
            self._sample_until_stopped()
        finally:
            self.cpu_s = time.thread_time()   # the sampler's own CPU, to take out of the process's

    def _sample_until_stopped(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me or not names.get(ident, "").startswith(self.prefixes):
                    continue
                self._sample(frame)

    def _sample(self, frame: Any) -> None:
        leaf = frame
        leaf_file = leaf.f_code.co_filename
        area = ""
        current = frame
        while current is not None:
            filename = current.f_code.co_filename
            marker = filename.find("/mailsync/")
            if marker >= 0 and "/site-packages/" not in filename:
                area = "mailsync." + filename[marker + 10:-3].replace("/", ".")
                break
            marker = filename.find("/functions/")
            if marker >= 0 and "/site-packages/" not in filename:
                area = "functions." + filename[marker + 11:-3].replace("/", ".")
                break
            current = current.f_back
        if any(part in leaf_file for part in _IDLE):
            doing = "idle"
        elif any(part in leaf_file for part in _NETWORK):
            doing = "network"
        else:
            doing = "python"
        bucket = f"{area or 'host'} [{doing}]"
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
        if doing == "python":
            where = f"{leaf.f_code.co_name} ({_short(leaf_file)}:{leaf.f_code.co_firstlineno})"
            self.leaves[where] = self.leaves.get(where, 0) + 1
        self.samples += 1

    def report(self, top: int = 12) -> list[str]:
        total = max(1, self.samples)
        busy = {k: v for k, v in self.buckets.items() if not k.endswith("[idle]")}
        idle = self.samples - sum(busy.values())
        lines = [f"where the worker threads' time goes ({self.samples} samples; idle {100 * idle / total:.0f} %):"]
        for name, count in sorted(busy.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * count / total:5.1f} %  {name}")
        python = sum(self.leaves.values()) or 1
        lines.append("hottest Python frames (share of [python] samples):")
        for name, count in sorted(self.leaves.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * count / python:5.1f} %  {name}")
        return lines


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        index = path.find(marker)
        if index >= 0:
            return path[index + len(marker):]
    return path


class ThreadProfiles:
    """cProfile in every thread started after ``install()`` (the host's loop, function and reader threads).

    Deterministic profiling slows Python code down 1.5-3x, so CPU figures
    of a profiled run are not the engine's; the profile says *which* code
    the CPU goes to.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("devhost", "mailsync", "graph-webhook", "store-bulk")) -> None:
        self._profiles: list[Any] = []
        self._lock = threading.Lock()
        self.prefixes = prefixes      # thread names to profile (not the benchmark's own threads)

    def install(self) -> None:
        import cProfile

        def boot(frame: Any, event: str, arg: Any) -> None:
            if not threading.current_thread().name.startswith(self.prefixes):
                sys.setprofile(None)
                return
            # Thread CPU time, not wall time: a thread blocked on a socket costs nothing.
            profile = cProfile.Profile(time.thread_time)
            with self._lock:
                self._profiles.append(profile)
            profile.enable()   # replaces this hook for the thread

        threading.setprofile(boot)

    def clear(self) -> None:
        """Forget what was recorded so far (profile only what follows)."""
        with self._lock:
            for profile in self._profiles:
                profile.clear()

    def report(self, top: int = 25, dump: Path | None = None) -> list[str]:
        """The profile's summary lines; ``dump``: also save the merged stats there (``pstats`` format)."""
        import io
        import pstats

        threading.setprofile(None)   # type: ignore[arg-type]
        with self._lock:
            profiles = list(self._profiles)
        if not profiles:
            return ["no profiled threads"]
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            with contextlib.suppress(TypeError):   # a thread that never ran Python code
                stats.add(profile)
        if dump is not None:
            stats.dump_stats(str(dump))
        by_area: dict[str, float] = {}
        for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            by_area[_area(filename)] = by_area.get(_area(filename), 0.0) + tottime
        total = sum(by_area.values()) or 1.0
        lines = [f"CPU by area (cProfile, thread CPU time, all profiled threads, {total:.1f} s):"]
        for area, seconds in sorted(by_area.items(), key=lambda kv: -kv[1])[:15]:
            lines.append(f"  {100 * seconds / total:5.1f} %  {seconds:7.2f} s  {area}")
        for order, title, restrict in (("tottime", "by own CPU time", ""),
                                       ("cumulative", "project code by cumulative CPU time", "mailsync/")):
            out = io.StringIO()
            stats.stream = out   # type: ignore[attr-defined]
            stats.sort_stats(order).print_stats(restrict, top) if restrict else \
                stats.sort_stats(order).print_stats(top)
            lines.append(f"top {top} functions {title}:")
            lines.extend("  " + line for line in out.getvalue().splitlines()
                         if line.strip() and "Ordered by" not in line and "List reduced" not in line)
        return lines


def _area(filename: str) -> str:
    for marker, name in (("/mailsync/", "mailsync."), ("/functions/", "functions."), ("/devhost/", "devhost.")):
        index = filename.find(marker)
        if index >= 0 and "/site-packages/" not in filename:
            return name + filename[index + len(marker):].removesuffix(".py").replace("/", ".")
    index = filename.find("/site-packages/")
    if index >= 0:
        return "lib: " + filename[index + 15:].split("/")[0]
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C calls: json, orjson, sockets...)"
    index = filename.find("/lib/python3")
    if index >= 0:
        return "stdlib: " + filename[index:].split("/")[3].removesuffix(".py")
    return filename
