"""Builds the sandbox's aiohttp application and runs it (CLI or in-process).

``create_app(config)`` wires every part on one :class:`SandboxState`:

    /{tenant}/...            identity platform (graph_sandbox.identity)
    /v1.0/subscriptions      change notifications (graph_sandbox.subscriptions)
    /v1.0/...                the mail API (graph_sandbox.mail_api)
    /sandbox/mail            the mailbox page for people (graph_sandbox.mail_page)
    /sandbox/...             the admin API (graph_sandbox.admin)

With ``config.state_path`` the state is loaded from and saved to that file
(graph_sandbox.persistence); without it, the sandbox lives in memory.

``SandboxServer`` runs that app on a free 127.0.0.1 port in a background
thread, for tests and for the local stack::

    server = SandboxServer(SandboxConfig(users=2, messages_per_user=50))
    base_url = server.start()        # "http://127.0.0.1:<port>"
    ...                              # talk HTTP to base_url
    server.stop()
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from aiohttp import web

from graph_sandbox.admin import AdminApi
from graph_sandbox.config import SandboxConfig
from graph_sandbox.identity import IdentityPlatform
from graph_sandbox.mail_api import MailApi
from graph_sandbox.mail_page import MailPage
from graph_sandbox.persistence import SandboxPersistence
from graph_sandbox.state import SandboxState
from graph_sandbox.subscriptions import SubscriptionService

log = logging.getLogger("graph_sandbox")

STATE_KEY: web.AppKey[SandboxState] = web.AppKey("state", SandboxState)
PERSISTENCE_KEY: web.AppKey[SandboxPersistence] = web.AppKey("persistence", SandboxPersistence)


def create_app(config: SandboxConfig, state: SandboxState | None = None) -> web.Application:
    """The whole sandbox as one aiohttp application."""
    state = state or SandboxState(config)
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[STATE_KEY] = state
    identity = IdentityPlatform(state)
    app.add_routes(identity.routes())
    subscriptions = SubscriptionService(state, identity=identity)
    app.add_routes(subscriptions.routes())

    async def start_subscriptions(_: web.Application) -> None:
        await subscriptions.start()

    async def stop_subscriptions(_: web.Application) -> None:
        await subscriptions.stop()

    app.on_startup.append(start_subscriptions)
    app.on_cleanup.append(stop_subscriptions)
    if config.state_path:
        # After every service exists: loading fills them; saving runs after they stopped.
        persistence = SandboxPersistence(Path(config.state_path), state, identity, subscriptions)
        persistence.load()
        app[PERSISTENCE_KEY] = persistence

        async def start_saving(_: web.Application) -> None:
            await persistence.start()

        async def stop_saving(_: web.Application) -> None:
            await persistence.stop()

        app.on_startup.append(start_saving)
        app.on_cleanup.append(stop_saving)
    app.add_routes(MailPage(state).routes())
    app.add_routes(AdminApi(state).routes())
    # Last: the catch-all /v1.0/{tail} must not shadow /v1.0/subscriptions.
    app.add_routes(MailApi(state, identity).routes())
    return app


class SandboxServer:
    """The sandbox in a background thread (its own event loop) on a free port."""

    def __init__(self, config: SandboxConfig | None = None, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.config = config or SandboxConfig()
        self.state = SandboxState(self.config)
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>``)."""
        if self._thread is not None:
            return self.base_url
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="graph-sandbox", daemon=True)
        self._thread.start()
        ready.wait(timeout=60)
        if failure:
            self._thread = None
            raise RuntimeError(f"Graph sandbox failed to start: {failure[0]!r}") from failure[0]
        if not self.base_url:
            raise RuntimeError("Graph sandbox did not start within 60 s")
        return self.base_url

    async def _serve(self) -> None:
        app = create_app(self.config, self.state)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self._host}:{port}"
        self.state.base_url = self.base_url

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(config: SandboxConfig) -> None:
    """Serve in the foreground until interrupted (the CLI)."""
    state = SandboxState(config)
    state.base_url = config.public_url or f"http://{config.host}:{config.port}"
    app = create_app(config, state)
    log.info("Graph sandbox on %s: %d users, %d messages each, seed %d, faults %s",
             state.base_url, config.users, config.messages_per_user, config.seed, config.faults)
    web.run_app(app, host=config.host, port=config.port, access_log=None, print=None,
                handler_cancellation=True)
