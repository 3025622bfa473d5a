"""The engine's own cost: an initial sync with no Graph latency, against the store's ceiling.

Usage::

    .venv/bin/python bench/pipeline.py --messages 100000 --latency-ms 0

Same stack as ``initial_sync.py`` (Azurite, the search node (OpenSearch) and the Graph
sandbox as child processes), except that the function app runs in *this*
process (the devhost, in a thread), so its CPU time can be counted and
its threads sampled. In one run:

1. ``store_ceiling_per_s``: the mailbox's own ``Message`` records (paged
   once through the Graph provider) bulk-loaded straight into the store
   with its best chunk size and number of parallel writers — no engine.
2. The account is linked like the page does and synced to "synced":
   ``messages_per_s``; ``engine_efficiency = messages_per_s /
   store_ceiling_per_s`` (goal >= 0.9).
3. ``engine_cpu_us_per_msg``: CPU time of this process during the sync,
   minus its idle rate measured just before (the host's queue polling and
   timers), minus the benchmark's own status polls (their CPU is measured
   after the sync on the same rows) and the sampler's own CPU, per message
   (goal <= 30 us). This is
   everything the worker pays: Graph HTTP + JSON parsing, mapping, store
   documents + bulk JSON, table and queue calls, events.
   ``process_cpu_us_per_msg`` is the same without the idle correction;
   ``store_cpu_us_per_msg`` and ``graph_cpu_us_per_msg`` are the search node's and
   the sandbox's CPU per message (their processes), for the capacity model.
4. Where the time goes: a sampling profile of the worker threads (an
   in-process sampler like py-spy: 100 Hz, by project module and by
   network / idle / python; its own CPU is taken out of the figures),
   printed before the final line; with ``--cprofile``, also a deterministic
   profile of every host thread (CPU by area and the top functions).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import parser_from_doc
from bench.harness import (
    StackSampler,
    ThreadProfiles,
    compare,
    cpu_s,
    fetch_mailbox,
    figures,
    say,
    start_stack,
    store_ceiling,
)


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {"GRAPH_PAGE_SIZE": str(args.page_size), "POLL_INTERVAL_SUBSCRIBED_S": "0"}
    stack = start_stack("pipeline", users=1, messages=args.messages, latency_ms=0, seed=args.seed, env=env,
                        start_host=False)
    try:
        address = stack.sandbox.users()[0]["mail"]
        say("paging the mailbox once through the Graph provider (the documents for the store ceiling)")
        box = fetch_mailbox(stack.sandbox, address, stack.settings, page_size=500)
        total = len(box.messages)
        say(f"store alone: bulk-loading {total} messages (best chunk size first)")
        ceiling = store_ceiling(stack.search.url, box.messages,
                                chunks=[int(c) for c in args.store_chunks.split(",") if c.strip()],
                                streams=[int(w) for w in args.store_writers.split(",") if w.strip()],
                                sample=args.store_sample)
        say(f"store_ceiling_per_s={ceiling.docs_per_s:,.0f} (chunk {ceiling.best_chunk}, {ceiling.elapsed_s:.1f} s)")
        del box
        gc.collect()

        profiles = ThreadProfiles() if args.cprofile else None
        if profiles is not None:
            profiles.install()
        stack.start_host_in_process()
        say(f"function app hosted in this process at {stack.base_url}; measuring the idle CPU rate")
        idle_started, idle_cpu = time.monotonic(), process_cpu_s()
        while time.monotonic() - idle_started < args.idle_s:
            time.sleep(args.poll_s)
        idle_rate = (process_cpu_s() - idle_cpu) / (time.monotonic() - idle_started)

        stack.sandbox.reset_counters()
        node0, sandbox0 = cpu_s(stack.search.process.pid) or 0.0, cpu_s(stack.sandbox_process.process.pid) or 0.0
        sampler = StackSampler()
        sampler.start()
        cpu0, window0 = process_cpu_s(), time.monotonic()
        say(f"linking {address}; syncing {total} messages with no Graph latency")
        linked = stack.link(address)
        last = [time.monotonic()]

        def report(view: dict[str, Any]) -> None:
            if time.monotonic() - last[0] > 10:
                last[0] = time.monotonic()
                sync = view.get("sync") or {}
                say(f"  {sync.get('messages_indexed', '?')} indexed, "
                    f"{sync.get('folders_done', '?')}/{sync.get('folders_total', '?')} folders")

        polled = [0]

        def counted(view: dict[str, Any]) -> None:
            polled[0] += 1
            report(view)

        synced_at = stack.wait_status(linked, "synced", timeout_s=args.timeout_s, interval_s=args.poll_s,
                                      on_poll=counted)
        cpu1, window1 = process_cpu_s(), time.monotonic()
        sampler.stop()
        # What one status poll costs this process (the app reads the account and its sync rows):
        # measured now, on the same rows, and taken out of the sync's CPU below.
        polls, poll_cpu0 = 20, process_cpu_s()
        for _ in range(polls):
            stack.account(linked)
        poll_cpu = (process_cpu_s() - poll_cpu0) / polls
        elapsed = synced_at - linked.callback_started
        node_cpu = (cpu_s(stack.search.process.pid) or 0.0) - node0
        sandbox_cpu = (cpu_s(stack.sandbox_process.process.pid) or 0.0) - sandbox0
        requests_served = int(stack.sandbox.counters()["requests"])
        say(f"synced in {elapsed:.1f} s; comparing the store with the mailbox")
        store = stack.store()
        diff = compare(store, linked.account_id, stack.sandbox.snapshot(address))
        store.close()
        for line in sampler.report():
            print(line, flush=True)
        if profiles is not None:
            for line in profiles.report():
                print(line, flush=True)
        raw = cpu1 - cpu0 - sampler.cpu_s
        net = max(0.0, raw - idle_rate * (window1 - window0) - polled[0] * poll_cpu)
        rate = total / elapsed
        return {
            "messages": total, "page_size": args.page_size, "elapsed_s": elapsed, "messages_per_s": rate,
            "store_ceiling_per_s": ceiling.docs_per_s, "store_chunk": ceiling.best_chunk,
            "store_writers": ceiling.writers,
            "source_bytes_per_msg": ceiling.source_bytes_per_msg,
            "engine_efficiency": rate / ceiling.docs_per_s if ceiling.docs_per_s else float("nan"),
            "engine_cpu_us_per_msg": 1e6 * net / total, "process_cpu_us_per_msg": 1e6 * raw / total,
            "engine_cores": net / elapsed, "idle_cpu_rate": idle_rate, "status_poll_cpu_ms": 1000 * poll_cpu,
            "store_cpu_us_per_msg": 1e6 * node_cpu / total, "graph_cpu_us_per_msg": 1e6 * sandbox_cpu / total,
            "graph_requests": requests_served,
            "missing": len(diff.missing), "extra": len(diff.extra), "stale": len(diff.stale),
        }
    finally:
        stack.stop_and_clean(keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--messages", type=int, default=100_000, help="messages in the mailbox (default 100000)")
    parser.add_argument("--latency-ms", type=int, default=0, choices=[0],
                        help="Graph latency: 0 (this benchmark is about the engine's own cost)")
    parser.add_argument("--page-size", type=int, default=500, help="the engine's GRAPH_PAGE_SIZE (default 500)")
    parser.add_argument("--seed", type=int, default=42, help="sandbox seed (decides the mailbox)")
    parser.add_argument("--store-writers", default="1,4",
                        help="parallel bulk writers tried for the store bound (default 1,4)")
    parser.add_argument("--store-chunks", default="1000,2000",
                        help="bulk chunk sizes tried for the store ceiling (default 1000,2000)")
    parser.add_argument("--store-sample", type=int, default=3000, help="messages per chunk-size sample")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle CPU measurement before the sync (s)")
    parser.add_argument("--poll-s", type=float, default=0.5, help="status poll interval during the sync (s)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="give up on the sync after this long")
    parser.add_argument("--cprofile", action="store_true",
                        help="also profile every host thread with cProfile (slows the engine: CPU figures of "
                             "such a run are inflated; the profile shows where CPU goes)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)
    result = run(args)
    print(figures("pipeline", result), flush=True)
    return 0 if result["missing"] == result["extra"] == result["stale"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
