"""``python -m graph_sandbox``: serve the Graph sandbox in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime

from graph_sandbox.config import SandboxConfig, parse_rate_limit
from graph_sandbox.faults import PROFILES


def parse_args(argv: list[str] | None = None) -> SandboxConfig:
    parser = argparse.ArgumentParser(prog="python -m graph_sandbox",
                                     description="A local Microsoft Graph (mail) and identity platform.")
    defaults = SandboxConfig()
    parser.add_argument("--host", default=defaults.host, help="interface to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="decides all data (default %(default)s)")
    parser.add_argument("--users", type=int, default=defaults.users, help="sandbox users (default %(default)s)")
    parser.add_argument("--messages-per-user", type=int, default=defaults.messages_per_user,
                        help="messages seeded per mailbox (default %(default)s)")
    parser.add_argument("--latency-ms", type=int, default=0,
                        help="added to every mail API request (once per $batch, not per item)")
    parser.add_argument("--execution-ms", type=int, default=0,
                        help="time a $batch item holds its mailbox concurrency slot (Outlook executing it)")
    parser.add_argument("--faults", default="none", choices=sorted(PROFILES), help="fault profile")
    parser.add_argument("--fault-seed", type=int, default=None, help="seed of the fault plan (default: --seed)")
    parser.add_argument("--access-token-lifetime-s", type=int, default=defaults.access_token_lifetime_s)
    parser.add_argument("--rate-limit", default=None,
                        help="requests per app+mailbox per window, e.g. 10000/10m (default 10000/600)")
    parser.add_argument("--delta-token-ttl-s", type=float, default=defaults.delta_token_ttl_s)
    parser.add_argument("--delta-token-cache", type=int, default=defaults.delta_token_cache,
                        help="delta links kept per folder, newest first; older ones answer SyncStateNotFound "
                             "(default %(default)s, 0: off)")
    parser.add_argument("--delta-expired-status", type=int, default=defaults.delta_expired_status,
                        choices=(400, 410), help="status of an evicted delta link (default %(default)s)")
    parser.add_argument("--delta-lag-s", type=float, default=defaults.delta_lag_s,
                        help="a change shows in delta this many seconds after it is made (default %(default)s)")
    parser.add_argument("--delta-replay-rate", type=float, default=defaults.delta_replay_rate,
                        help="chance that a delta page's items come again on the next page (default %(default)s)")
    parser.add_argument("--search-folders", type=int, default=defaults.search_folders,
                        help="mailSearchFolders seeded per mailbox, 0..2 (default %(default)s)")
    parser.add_argument("--anchor", default=None, help="ISO date the seeded mail is dated back from")
    parser.add_argument("--public-url", default=None, help="base URL to put in links (default: request origin)")
    parser.add_argument("--state-file", default=None,
                        help="keep mailboxes, tokens and subscriptions in this file across restarts "
                             "(default: in memory only)")
    parser.add_argument("--allow-http-loopback-webhooks", action="store_true",
                        help="accept http:// notification URLs on 127.0.0.1/localhost/[::1] (Graph wants https; "
                             "a local stack serves http)")
    args = parser.parse_args(argv)
    changes = {}
    if args.rate_limit:
        try:
            changes["rate_limit_requests"], changes["rate_limit_window_s"] = parse_rate_limit(args.rate_limit)
        except ValueError as exc:
            parser.error(str(exc))
    if args.anchor:
        try:
            changes["anchor"] = datetime.fromisoformat(args.anchor.replace("Z", "+00:00"))
        except ValueError:
            parser.error(f"--anchor {args.anchor!r} is not an ISO date")
    try:
        return SandboxConfig(host=args.host, port=args.port, seed=args.seed, users=args.users,
                             messages_per_user=args.messages_per_user, latency_ms=args.latency_ms,
                             execution_ms=args.execution_ms,
                             faults=args.faults, fault_seed=args.fault_seed,
                             access_token_lifetime_s=args.access_token_lifetime_s,
                             delta_token_ttl_s=args.delta_token_ttl_s, public_url=args.public_url,
                             allow_http_loopback_webhooks=args.allow_http_loopback_webhooks,
                             state_path=args.state_file,
                             delta_token_cache=args.delta_token_cache, delta_expired_status=args.delta_expired_status,
                             delta_lag_s=args.delta_lag_s, delta_replay_rate=args.delta_replay_rate,
                             search_folders=args.search_folders, **changes)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from graph_sandbox.server import run  # late: keeps --help fast

    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
