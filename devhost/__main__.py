"""``python -m devhost``: run function_app.py locally, as ``func start`` would.

    python -m devhost [--port 7071] [--host 127.0.0.1] [--app function_app:app]
                      [--functions name,name] [--ready-file PATH]

Reads host.json and local.settings.json from the script root (the current
directory by default), puts local.settings.json's Values into the
environment where not already set (as ``func start`` does), imports the
app and serves it until Ctrl-C or SIGTERM, then shuts down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from devhost.config import ConfigError, load_host_config, load_local_settings
from devhost.host import Devhost, DevhostOptions
from devhost.index import IndexingError, load_app
from devhost.queues import BindingError
from devhost.routing import RouteError
from devhost.services.process import write_ready_file
from mailsync.logs import configure_logging

log = logging.getLogger("devhost")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devhost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7071, help="port (default 7071, as func start; 0 = any free)")
    parser.add_argument("--app", default="function_app:app", help="module[:attribute] of the FunctionApp")
    parser.add_argument("--script-root", default=".", type=Path, help="folder with host.json and the app")
    parser.add_argument("--functions", default="", help="comma-separated function names to run (default: all)")
    parser.add_argument("--local-settings", default="local.settings.json",
                        help="settings file under the script root ('' to read only the environment)")
    parser.add_argument("--static", default="static_web", help="folder served at / ('' to serve nothing)")
    parser.add_argument("--queue-lease-s", type=float, default=60.0,
                        help="how long a running queue message stays invisible, renewed at half (default 60)")
    parser.add_argument("--shutdown-grace-s", type=float, default=10.0,
                        help="how long shutdown waits for running invocations before returning their messages")
    parser.add_argument("--ready-file", type=Path, help="write {\"url\": ...} here once serving (for tools and tests)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, on_ready: Callable[[str], None] | None = None) -> int:
    root = args.script_root.resolve()
    local = load_local_settings(root / args.local_settings) if args.local_settings else {}
    for key, value in local.items():
        os.environ.setdefault(key, value)  # the environment wins, as with func start
    configure_logging(os.environ.get("LOG_FORMAT") or "json")
    config = load_host_config(root / "host.json")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    app = load_app(args.app)
    only = frozenset(n.strip() for n in args.functions.split(",") if n.strip()) or None
    static_dir = (root / args.static) if args.static else None
    options = DevhostOptions(static_dir=static_dir, only_functions=only, queue_lease_s=args.queue_lease_s,
                             shutdown_grace_s=args.shutdown_grace_s, function_directory=str(root))
    devhost = Devhost(app, dict(os.environ), config, options)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    base_url = await devhost.start(args.host, args.port)
    print(f"devhost: serving {args.app} at {base_url}", flush=True)
    for line in devhost.describe():
        print(f"  {line}", flush=True)
    if static_dir is not None and static_dir.is_dir():
        print(f"  static: {base_url}/ ({static_dir.name}/)", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, {"url": base_url, "pid": os.getpid()})
    if on_ready is not None:
        on_ready(base_url)

    await stop.wait()
    print("devhost: shutting down (Ctrl-C again to force)", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: os._exit(130))
    await devhost.stop()
    print("devhost: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code = asyncio.run(serve(args))
    except (ConfigError, IndexingError, RouteError, BindingError) as exc:
        print(f"devhost: {exc}", file=sys.stderr)
        return 2
    # A function thread that never returns must not keep the process alive after shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
