"""Onboarding: N sandbox accounts linked at once, until every one is synced; what each account costs.

Usage::

    .venv/bin/python bench/onboarding.py --accounts 30 --count-storage
    .venv/bin/python bench/onboarding.py --accounts 1000 --link-parallel 16 --workers 2 --count-storage
    .venv/bin/python bench/onboarding.py --accounts 5 --in-process --cprofile     # where the app's CPU goes

On the local stack (``bench.harness``: Azurite, the search node, the Graph
sandbox with one user per account, the devhost running the whole app, plus
``--workers`` queue-trigger devhosts), ``--accounts`` users are linked the
way the page does it, ``--link-parallel`` sign-ins at a time (each its own
browser), and the benchmark waits until every account's status is
``synced`` (read from the accounts table, straight from Azurite).

Figures (one ``onboarding key=value ...`` line):

* ``link_s``: from the first sign-in until every OAuth callback answered;
  ``sync_all_s``: from the first sign-in until every account is synced;
  ``accounts_per_s`` = accounts / ``sync_all_s`` (issue 18's target: ≥ 5/s
  for 1,000 accounts of 20 messages);
* a sign-in's three round trips, each ``_p50_ms`` / ``_p99_ms``:
  ``create`` (``POST /api/accounts``: the account and its pending sign-in),
  ``form`` (the sandbox's sign-in form, answered with the redirect to our
  callback) and ``callback`` (the OAuth callback: code redeemed, ``/me``,
  the account's rows, the first job);
* every cost below runs from the first sign-in until the queue is quiet
  after the last account was synced (the sweep after subscribing and its
  look-agains, 2 and 10 s later, are onboarding's too); the ``_at_synced``
  figures stop at the last "synced";
* ``graph_requests_per_account``: requests the sandbox served (the app's,
  plus the sign-in form's two) per account;
* with ``--count-storage``: ``table_tx_per_account``, ``queue_tx_per_account``
  (everything the app sent to Azurite, through a counting proxy), and the
  calls by table and row kind are logged;
* ``cpu_s_per_account_<process>`` for ``hosts`` (the devhost and workers, or
  this process with ``--in-process``), ``node`` (the search node),
  ``azurite`` and ``sandbox``, and their sum ``cpu_s_per_account``: CPU
  seconds each spent, net of its idle rate (measured for ``--idle-s``
  afterwards, every process warm), per account; ``load_1m`` beside them (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import parser_from_doc
from bench.harness import (
    Stack,
    ThreadProfiles,
    cpu_s,
    diff_counts,
    figures,
    link_many,
    percentile,
    record_store_generation,
    say,
    start_stack,
    tree_cpu_s,
    wait_synced,
)


def process_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each process group the onboarding loads."""
    hosts = [p.pid for p in [stack.host, *stack.workers] if p is not None]
    host_cpu = sum(cpu_s(pid) or 0.0 for pid in hosts)
    if stack.in_process is not None:
        host_cpu += cpu_s(os.getpid()) or 0.0     # includes the benchmark's own sign-in threads
    return {"hosts": host_cpu,
            "node": tree_cpu_s(stack.search.process.pid),
            "azurite": sum(tree_cpu_s(p.pid) for p in stack.azurite.processes),
            "sandbox": tree_cpu_s(stack.sandbox_process.process.pid)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    stack = start_stack("onboarding", users=args.accounts, messages=args.messages_per_account, seed=args.seed,
                        env={"POLL_INTERVAL_SUBSCRIBED_S": "0"}, count_storage=args.count_storage,
                        start_host=not args.in_process)
    profiles = ThreadProfiles() if args.cprofile else None
    try:
        if args.in_process:
            if profiles is not None:
                profiles.install()
            stack.start_host_in_process()
        for _ in range(args.workers):
            stack.add_worker()
        addresses = [u["mail"] for u in stack.sandbox.users()][: args.accounts]
        record_store_generation(stack)
        stack.wait_quiet(looks=2)
        counter = stack.storage_counter
        storage0 = counter.snapshot() if counter else {}
        requests0 = stack.sandbox.requests_served()
        cpu0 = process_cpu(stack)
        if profiles is not None:
            profiles.clear()
        say(f"linking {len(addresses)} accounts ({args.messages_per_account} messages each), "
            f"{args.link_parallel} sign-ins at a time, {1 + args.workers} host process(es); "
            f"load {os.getloadavg()[0]:.1f}")
        started = time.monotonic()
        linked = link_many(stack, addresses, args.link_parallel)
        link_s = time.monotonic() - started
        say(f"linked in {link_s:.1f} s; waiting until every account is synced")
        wait_synced(stack, {a.account_id for a in linked}, args.timeout_s, poll_s=0.5)
        sync_all_s = time.monotonic() - started
        load = os.getloadavg()[0]
        at_synced = process_cpu(stack), (counter.snapshot() if counter else {}), stack.sandbox.requests_served()
        # What follows the last "synced" is onboarding's too: the sweep after subscribing and its two
        # look-agains (2 and 10 s later). The costs below run until the queue is quiet.
        quiet_s = stack.wait_quiet(looks=5)
        tail_s = time.monotonic() - started - sync_all_s
        say(f"queue quiet {quiet_s:.0f} s after the last account was synced")
        cpu1 = process_cpu(stack)
        # The stack's idle rate (queue polling, timers, the node's housekeeping), measured now that every
        # process is warm (the node's JIT at start-up made an idle window before the run worthless).
        idle0, idle_t0 = cpu1, time.monotonic()
        time.sleep(args.idle_s)
        idle_rate = {k: (v - idle0[k]) / (time.monotonic() - idle_t0) for k, v in process_cpu(stack).items()}
        n = max(1, len(linked))
        callbacks = [1000 * (a.callback_done - a.callback_started) for a in linked]
        creates = [1000 * (a.form_started - a.started) for a in linked]
        forms = [1000 * (a.callback_started - a.form_started) for a in linked]
        values: dict[str, Any] = {
            "accounts": len(linked), "messages_per_account": args.messages_per_account,
            "link_parallel": args.link_parallel, "workers": args.workers,
            "link_s": link_s, "sync_all_s": sync_all_s, "accounts_per_s": len(linked) / sync_all_s,
            "create_p50_ms": percentile(creates, 0.5), "create_p99_ms": percentile(creates, 0.99),
            "form_p50_ms": percentile(forms, 0.5), "form_p99_ms": percentile(forms, 0.99),
            "callback_p50_ms": percentile(callbacks, 0.5), "callback_p99_ms": percentile(callbacks, 0.99),
            "graph_requests_per_account": (stack.sandbox.requests_served() - requests0) / n,
        }
        values["graph_requests_per_account_at_synced"] = (at_synced[2] - requests0) / n
        if counter is not None:
            used = diff_counts(counter.snapshot(), storage0)
            synced_used = diff_counts(at_synced[1], storage0)
            values["table_tx_per_account"] = used.get("table_total", 0) / n
            values["queue_tx_per_account"] = used.get("queue_total", 0) / n
            values["table_tx_per_account_at_synced"] = synced_used.get("table_total", 0) / n
            values["queue_tx_per_account_at_synced"] = synced_used.get("queue_total", 0) / n
            say("storage calls per account, by kind:")
            for key, count in sorted(used.items(), key=lambda kv: -kv[1]):
                if key.startswith(("rows@", "queue_", "table_")) and count / n >= 0.5:
                    say(f"  {count / n:8.2f}  {key}")
        for name in cpu0:
            spent = cpu1[name] - cpu0[name] - idle_rate[name] * (sync_all_s + tail_s)
            values[f"cpu_s_per_account_{name}"] = spent / n
        values["cpu_s_per_account"] = sum(values[f"cpu_s_per_account_{name}"] for name in cpu0)
        values["load_1m"] = load
        if profiles is not None:
            dump = Path(args.profile_out) if args.profile_out else None
            for line in profiles.report(top=40, dump=dump):
                print(line, flush=True)
        return values
    finally:
        stack.stop_and_clean(keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--accounts", type=int, default=20, help="accounts to link at once (default 20)")
    parser.add_argument("--messages-per-account", type=int, default=20, help="seeded messages per mailbox")
    parser.add_argument("--link-parallel", type=int, default=8, help="sign-ins at a time (default 8)")
    parser.add_argument("--workers", type=int, default=0, help="extra queue-trigger devhosts (default 0)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the sandbox tenant")
    parser.add_argument("--idle-s", type=float, default=10, help="idle window after the run (CPU baseline)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="limit for every account to be synced")
    parser.add_argument("--count-storage", action="store_true",
                        help="count queue and table transactions (a counting proxy in front of Azurite)")
    parser.add_argument("--in-process", action="store_true", help="host the app in this process (for --cprofile)")
    parser.add_argument("--cprofile", action="store_true",
                        help="with --in-process: cProfile the app's threads from the first sign-in on")
    parser.add_argument("--profile-out", default="",
                        help="with --cprofile: also save the merged profile here (pstats format)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)
    print(figures("onboarding", run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
