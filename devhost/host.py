"""The devhost: one aiohttp server, the queue listeners and the timers of one Function App.

``Devhost`` is what ``python -m devhost`` runs and what tests start in
process (``DevhostThread``). It is given the app, the app settings and the
host.json configuration explicitly; only ``__main__`` reads files and the
environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func
from aiohttp import web

from devhost.bindings import Bindings, http_binding_data
from devhost.config import HostConfig
from devhost.index import FunctionSpec, index_app
from devhost.invoke import Invoker, default_thread_count
from devhost.os_threads import IO_THREAD, LOOP_THREAD, name_os_thread
from devhost.queues import BindingError, QueueClients, QueueListener
from devhost.routing import RouteTemplate
from devhost.services.process import site_port
from devhost.signalr import PATH as SIGNALR_PATH
from devhost.signalr import SignalRService
from devhost.static_site import StaticSite
from devhost.timers import TimerRunner
from mailsync.logs import log_context

log = logging.getLogger("devhost")

# Azure's front end accepts 100 MB; the app enforces its own, smaller limits and answers them itself.
MAX_REQUEST_BYTES = 100 * 1024 * 1024
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")


@dataclass
class DevhostOptions:
    """Knobs of the devhost itself (not of the app)."""

    static_dir: Path | None = None
    only_functions: frozenset[str] | None = None
    queue_lease_s: float = 60.0
    shutdown_grace_s: float = 10.0
    function_directory: str = "."
    extra_routes: list[web.AbstractRouteDef] = field(default_factory=list)


@dataclass
class _HttpRoute:
    template: RouteTemplate
    methods: tuple[str, ...]
    spec: FunctionSpec


def _append_forwarded_for(headers: dict[str, str], peer: str | None) -> None:
    """Append the connecting peer to X-Forwarded-For, as Azure's front end does for a Function App.

    The app trusts the entry its nearest proxy appended (mailsync/security/client_ip.py),
    so under the devhost, too, that entry is the peer the socket saw, not one the client wrote.
    """
    if not peer:
        return
    name = next((key for key in headers if key.lower() == "x-forwarded-for"), "X-Forwarded-For")
    headers[name] = f"{headers[name]}, {peer}" if headers.get(name) else peer


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


class Devhost:
    """Hosts one Function App: HTTP, queue and timer triggers, queue and SignalR bindings."""

    def __init__(self, app: func.FunctionApp, settings: Mapping[str, str], config: HostConfig | None = None,
                 options: DevhostOptions | None = None) -> None:
        self.settings = dict(settings)
        self.config = config or HostConfig()
        self.options = options or DevhostOptions()
        self.functions = index_app(app, self.settings, self.options.only_functions)
        self.signalr = SignalRService.from_settings(self.settings)
        static_dir = self.options.static_dir
        # The page's files with Static Web Apps' global headers (its CSP), read once.
        self._site = StaticSite(static_dir) if static_dir is not None and static_dir.is_dir() else None
        self.base_url = ""
        self._routes: list[_HttpRoute] = []
        for spec in self.functions:
            if spec.trigger_type == "httpTrigger":
                template = RouteTemplate.parse(str(spec.trigger.get("route") or spec.name))
                methods = tuple(m.upper() for m in spec.trigger.get("methods") or ALL_METHODS)
                self._routes.append(_HttpRoute(template, methods, spec))
        self._routes.sort(key=lambda r: r.template.specificity)
        self._invoker: Invoker | None = None
        self._queues: QueueClients | None = None
        self._bindings: Bindings | None = None
        self._listeners: list[QueueListener] = []
        self._timers: list[TimerRunner] = []
        self._runner: web.AppRunner | None = None
        self._inflight_http: set[asyncio.Task[Any]] = set()

    # Lifecycle.

    async def start(self, host: str = "127.0.0.1", port: int = 7071) -> str:
        """Start serving; returns the base URL (port 0 picks a free port)."""
        loop = asyncio.get_running_loop()
        # The listeners' Storage calls and aiohttp's name lookups run here: named, so CPU accounts
        # (bench/) can tell the host's work from the functions' (devhost/os_threads.py).
        loop.set_default_executor(ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4),
                                                     thread_name_prefix=IO_THREAD,
                                                     initializer=name_os_thread, initargs=(IO_THREAD,)))
        self._invoker = Invoker(threads=default_thread_count(self.settings),
                                function_timeout_s=self.config.function_timeout_s,
                                function_directory=self.options.function_directory)
        self._queues = QueueClients(self.settings)
        self._bindings = Bindings(self._queues, self.signalr, self.config.queues.message_encoding)

        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_get("/admin/host/status", self._status)
        app.router.add_routes(self.signalr.routes())
        app.router.add_routes(self.options.extra_routes)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site_port(site, port)
        display_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{display_host}:{bound}"
        self.signalr.attach(loop, self.base_url)

        for spec in self.functions:
            if spec.trigger_type == "queueTrigger":
                listener = QueueListener(spec, self._queues, self.config.queues, self._invoker, self._bindings,
                                         lease_s=self.options.queue_lease_s)
                self._listeners.append(listener)
            elif spec.trigger_type == "timerTrigger":
                self._timers.append(TimerRunner(spec, self._invoker, self._bindings))
        for listener in self._listeners:
            listener.start()
        for timer in self._timers:
            timer.start()
        return self.base_url

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop triggers, finish or return in-flight work, close the server."""
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        await asyncio.gather(*(listener.stop(grace) for listener in self._listeners),
                             *(timer.stop(grace) for timer in self._timers))
        if self._inflight_http:
            await asyncio.wait(list(self._inflight_http), timeout=grace)
        await self.signalr.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._queues is not None:
            await self._queues.close()
        if self._invoker is not None:
            self._invoker.shutdown()

    def describe(self) -> list[str]:
        """One line per function, like ``func start`` prints."""
        lines = []
        prefix = f"/{self.config.route_prefix}" if self.config.route_prefix else ""
        for spec in self.functions:
            trigger = spec.trigger
            if spec.trigger_type == "httpTrigger":
                methods = ",".join(trigger.get("methods") or ["*"])
                route = str(trigger.get("route") or spec.name)
                lines.append(f"{spec.name}: [{methods}] {self.base_url}{prefix}/{route}")
            elif spec.trigger_type == "queueTrigger":
                lines.append(f"{spec.name}: queueTrigger {trigger.get('queueName')}")
            else:
                lines.append(f"{spec.name}: timerTrigger {trigger.get('schedule')}")
        return lines

    # HTTP.

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"state": "Running", "host": "devhost",
                                  "functions": [s.name for s in self.functions]})

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._inflight_http.add(task)
        try:
            return await self._dispatch_inner(request)
        finally:
            if task is not None:
                self._inflight_http.discard(task)

    async def _dispatch_inner(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        prefix = f"/{self.config.route_prefix}" if self.config.route_prefix else ""
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return await self._static(request)
        relative = path[len(prefix):]
        allowed: list[str] = []
        for route in self._routes:
            values = route.template.match(relative)
            if values is None:
                continue
            if request.method not in route.methods:
                allowed.extend(m for m in route.methods if m not in allowed)
                continue
            return await self._invoke_http(request, route, values)
        if allowed:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on {path}",
                          {"Allow": ", ".join(allowed)})
        if not prefix:
            return await self._static(request)
        return _error(404, "not_found", f"no function serves {path}")

    async def _invoke_http(self, request: web.Request, route: _HttpRoute, values: dict[str, str]) -> web.Response:
        assert self._invoker is not None and self._bindings is not None
        spec = route.spec
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "payload_too_large", f"request body is over {MAX_REQUEST_BYTES} bytes")
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        _append_forwarded_for(headers, request.remote)
        query = {k: request.query.getone(k) for k in request.query}
        req = func.HttpRequest(method=request.method, url=str(request.url), headers=headers, params=query,
                               route_params=values, body=body)
        invocation_id = str(uuid.uuid4())
        data = http_binding_data(headers, query, values, body)
        endpoint = f"{request.scheme}://{request.host}{SIGNALR_PATH}"
        with log_context(function=spec.name, invocation_id=invocation_id):
            try:
                args = {spec.trigger.name: req, **self._bindings.inputs(spec, data, signalr_endpoint=endpoint)}
                invocation = await self._invoker.invoke(spec, args, invocation_id=invocation_id)
                await self._bindings.write(spec, invocation, data)
                http_out = next((b for b in spec.outputs if b.type == "http"), None)
                result = invocation.output(http_out.name) if http_out is not None else None
                return _to_response(result)
            except BindingError as exc:
                log.error("function %s: binding failed: %s", spec.name, exc)
                return _error(500, "binding_error", "a binding of the function failed; see the devhost log")
            except Exception:
                log.exception("function %s failed", spec.name)
                return _error(500, "internal_error", "the function failed; see the devhost log")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        site = self._site
        if site is None or request.method not in ("GET", "HEAD"):
            return _error(404, "not_found", f"nothing at {request.path}")
        file = site.resolve(request.path)
        if file is None:
            return _error(404, "not_found", f"nothing at {request.path}")
        return site.response(file)


def _to_response(result: Any) -> web.Response:
    """The HTTP response for a function's return value, accepting what the Python worker accepts."""
    if result is None:
        return web.Response(status=204)
    if isinstance(result, str):
        return web.Response(text=result, content_type="text/plain")
    if not isinstance(result, func.HttpResponse):
        raise TypeError(f"an HTTP function must return func.HttpResponse or str, not {type(result).__name__}")
    response = web.Response(status=result.status_code, body=result.get_body() or b"")
    has_type = False
    for key, value in result.headers.items():
        if key.lower() == "content-type":
            has_type = True
        if key.lower() == "content-length":
            continue
        response.headers.add(key, value)
    if not has_type:
        mimetype = result.mimetype or "text/plain"
        response.headers["Content-Type"] = (f"{mimetype}; charset={result.charset}" if mimetype.startswith("text/")
                                            else mimetype)
    return response


class DevhostThread:
    """A Devhost on its own event loop in a background thread (tests, benchmarks, tools)."""

    def __init__(self, devhost: Devhost) -> None:
        self.devhost = devhost
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=LOOP_THREAD, daemon=True)
        self.base_url = ""

    def _run_loop(self) -> None:
        name_os_thread(LOOP_THREAD)
        self._loop.run_forever()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.devhost.start(host, port), self._loop)
        self.base_url = future.result(timeout=30)
        return self.base_url

    def stop(self, grace_s: float | None = None) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.devhost.stop(grace_s), self._loop)
        try:
            future.result(timeout=60)
            # aiohttp resolves names in the loop's default executor: close its threads too.
            asyncio.run_coroutine_threadsafe(self._loop.shutdown_default_executor(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the devhost's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout)
