"""Interim: my routes mounted in a tiny aiohttp app until SandboxServer lands."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from graph_sandbox.config import SandboxConfig
from graph_sandbox.identity import IdentityPlatform
from graph_sandbox.state import SandboxState
from graph_sandbox.subscriptions import SubscriptionService


class LocalSandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.state = SandboxState(config)
        self.identity = IdentityPlatform(self.state)
        self.subscriptions = SubscriptionService(self.state, identity=self.identity)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def me(request: web.Request) -> web.Response:
            principal = self.identity.authenticate(request)
            user = self.state.users[principal.user_id]
            return web.json_response({"id": user.id, "mail": user.mail, "displayName": user.display_name})

        async def setup() -> None:
            app = web.Application()
            app.add_routes([*self.identity.routes(), *self.subscriptions.routes(), web.get("/v1.0/me", me)])
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            await self.subscriptions.start()

        self.loop.run_until_complete(setup())
        self._ready.set()
        self.loop.run_forever()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the server's loop thread (where state is mutated) and return its result."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        async def down() -> None:
            await self.subscriptions.stop()
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
