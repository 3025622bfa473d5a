"""The SignalR Service stand-in as a process of its own: ``python -m devhost.signalr_server``.

Why a process: on Azure the SignalR Service is a managed service, like
Storage, not part of the Function App. Run inside the devhost (the
default for ``make run``), its work — verifying each REST call's token,
fanning a message out to the user's connections, writing WebSocket
frames, pinging every client — shares the app's process, and a CPU
account of the app (``bench/change_latency.py``) counts it as the app's.
Run here, every devhost forwards to it through the REST API (what
Azure's output binding and server SDK do), clients negotiate with it, and
the benchmark counts its CPU apart, as it counts Azurite's.

The AccessKey comes from the environment (``SIGNALR_ACCESS_KEY``), never
the command line, which other users of the machine can read. Serves
``/signalr`` on ``--host:--port`` and writes ``{"url": ...}`` to
``--ready-file`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from devhost.services.process import site_port, write_ready_file
from devhost.signalr import PATH, SignalRService

ACCESS_KEY_ENV = "SIGNALR_ACCESS_KEY"
MAX_REQUEST_BYTES = 1 << 20


async def serve(host: str, port: int, access_key: str, ready_file: Path | None) -> None:
    """Serve until SIGTERM or SIGINT, then tell the clients the service is going away."""
    service = SignalRService(access_key)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_routes(service.routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site_port(site, port)
    url = f"http://{host}:{bound}{PATH}"
    service.attach(asyncio.get_running_loop(), f"http://{host}:{bound}")
    if ready_file is not None:
        write_ready_file(ready_file, {"url": url})
    logging.getLogger("devhost.signalr").info("SignalR Service stand-in at %s", url)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await service.close()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devhost.signalr_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--ready-file", type=Path, help="write {\"url\": ...} here once listening")
    args = parser.parse_args(argv)
    access_key = os.environ.get(ACCESS_KEY_ENV, "")
    if not access_key:
        parser.error(f"set {ACCESS_KEY_ENV} (the connection string's AccessKey)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.host, args.port, access_key, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
