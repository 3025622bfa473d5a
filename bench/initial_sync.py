"""Initial sync of one sandbox mailbox, end to end, against the bound the external limits impose.

Usage::

    .venv/bin/python bench/initial_sync.py --messages 100000 --folders 12 --latency-ms 100 [--page-size 500]
    .venv/bin/python bench/initial_sync.py --messages 10000,100000      # memory as the mailbox grows

For each mailbox size, on a fresh local stack (Azurite, the search node (OpenSearch), the
Graph sandbox as its own process, the devhost running the whole function
app — all on 127.0.0.1):

1. Page every folder's delta once through the product's Graph provider at
   the largest page size the sandbox accepts (500; no public source says
   Graph allows more), counting the pages: ``graph_bound_s =
   ceil(pages / 4) * latency`` (at most 4 requests in flight per mailbox).
2. Bulk-load those same ``Message`` records straight into the same store
   with its best chunk size and number of parallel writers (1 or 4, as
   the engine writes up to 4 folders at once; sampled first), no engine
   in between: ``store_bound_s``. ``bound_s = max(graph_bound_s, store_bound_s)``.
3. Turn on the Graph latency, link the account the way the page does
   (``POST /api/accounts``, the sandbox sign-in form, the OAuth callback)
   and time from the callback to ``status == "synced"`` (``elapsed_s``),
   and to the newest 50 Inbox messages being readable through
   ``GET /api/accounts/{id}/messages`` (``first_50_s``).
4. Compare the store with the sandbox's ground truth (missing / extra /
   stale must be 0).

Figures: ``elapsed_s``, ``bound_s`` (and both parts), ``ratio_to_bound``
(goal <= 1.2 at 100 ms), ``first_50_s`` (goal <= 2 s), ``messages_per_s``,
``resumes`` (full rounds that went on from a saved link in a later
invocation: the time budget, ``--time-budget-s``, cut them) and
``full_restarts`` (rounds the sandbox saw start over from scratch after it
answered that a folder's link was gone: with Outlook's token cache,
``--token-cache``, of 3 links per folder, this must be 0),
``graph_requests`` (served by the sandbox during the sync),
``peak_rss_mb`` (the devhost process's high-water mark, which runs every
function), plus ``longest_folder_chain_s``: the largest folder's pages *
latency at the engine's page size — one folder's delta is a chain of
requests, so no engine can finish before its largest folder does.
``messages`` is what the mailbox holds (the sandbox's seeding decides;
it may differ a little from ``--messages``). With ``--count-storage``:
``table_tx`` and ``queue_tx`` of the whole sync.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import parser_from_doc
from bench.harness import (
    Linked,
    Stack,
    compare,
    diff_counts,
    fetch_mailbox,
    figures,
    graph_bound_s,
    say,
    start_stack,
    store_ceiling,
)

MAX_PAGE_SIZE = 500   # the sandbox's cap for odata.maxpagesize on message delta (docs/graph-sandbox.md)


def _ensure_folders(stack: Stack, address: str, wanted: int) -> int:
    """Add empty user folders until the mailbox has ``wanted`` (the seed decides the tree: 12-17)."""
    snap = stack.sandbox.snapshot(address)
    have = len(snap["folders"])
    graph = stack.sandbox.graph(address)
    for n in range(have, wanted):
        answer = graph.post("me/mailFolders", json={"displayName": f"Bench folder {n + 1}"})
        if answer.status_code >= 300:
            raise RuntimeError(f"could not create a folder: {answer.status_code} {answer.text[:200]}")
    return max(have, wanted)


def _watch_first_screen(stack: Stack, linked: Linked, inbox_id: str, newest: set[str], seen: dict[str, float],
                        stop: threading.Event) -> None:
    """Poll the read API until the newest 50 Inbox messages are all there."""
    while not stop.is_set():
        try:
            got = {m["message_id"] for m in stack.messages(linked, folder_id=inbox_id, limit=len(newest) or 50)}
        except Exception:   # the API may 503 while the store index is being created: keep polling
            got = set()
        if newest and newest <= got:
            seen["first_50"] = time.monotonic()
            return
        stop.wait(0.05)


def _log_lines(workdir: Path, message: str) -> int:
    """How many records of the devhost logs under ``workdir`` carry ``message`` (JSON lines, ``msg``)."""
    count = 0
    for path in workdir.glob("devhost-*/devhost.log"):
        with path.open(encoding="utf-8", errors="replace") as lines:
            count += sum(1 for line in lines if f'"msg":"{message}"' in line.replace('": "', '":"'))
    return count


def run_once(args: argparse.Namespace, messages: int) -> dict[str, Any]:
    env = {"GRAPH_PAGE_SIZE": str(args.page_size), "POLL_INTERVAL_SUBSCRIBED_S": "0",
           "SYNC_TIME_BUDGET_S": str(args.time_budget_s)}
    stack = start_stack("initial-sync", users=1, messages=messages, latency_ms=0, seed=args.seed, env=env,
                        count_storage=args.count_storage,
                        sandbox_args=["--delta-token-cache", str(args.token_cache)])
    try:
        address = stack.sandbox.users()[0]["mail"]
        folders = _ensure_folders(stack, address, args.folders)
        say(f"paging the mailbox once at page size {MAX_PAGE_SIZE} (no latency) to count pages and get the "
            "documents")
        box = fetch_mailbox(stack.sandbox, address, stack.settings, page_size=MAX_PAGE_SIZE)
        total = len(box.messages)
        gbound = graph_bound_s(box.total_pages, args.latency_ms)
        say(f"{total} messages in {len(box.folders)} folders, {box.total_pages} delta pages at {MAX_PAGE_SIZE}: "
            f"graph_bound_s={gbound:.2f}")
        say("store alone: bulk-loading the same documents (best chunk size first)")
        ceiling = store_ceiling(stack.search.url, box.messages,
                                chunks=[int(c) for c in args.store_chunks.split(",") if c.strip()],
                                streams=[int(w) for w in args.store_writers.split(",") if w.strip()],
                                sample=args.store_sample)
        say(f"store_bound_s={ceiling.elapsed_s:.1f} ({ceiling.docs_per_s:,.0f} docs/s at chunk "
            f"{ceiling.best_chunk})")
        largest = max((count for count in _folder_counts(box).values()), default=0)
        chain_s = -(-largest // args.page_size) * args.latency_ms / 1000
        del box

        snap = stack.sandbox.snapshot(address)
        inbox_id = next(f["id"] for f in snap["folders"] if f["wellKnownName"] == "inbox")
        newest = {m["id"] for m in snap["messages"] if m["folderId"] == inbox_id}
        newest_sorted = sorted((m for m in snap["messages"] if m["id"] in newest),
                               key=lambda m: m["receivedDateTime"], reverse=True)
        newest = {m["id"] for m in newest_sorted[:50]}
        del snap, newest_sorted

        stack.sandbox.configure(latency_ms=args.latency_ms)
        stack.sandbox.reset_counters()
        storage0 = stack.storage_counter.snapshot() if stack.storage_counter else {}
        say(f"linking {address} (Graph latency {args.latency_ms} ms, engine page size {args.page_size})")
        linked = stack.link(address)
        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_first_screen,
                                   args=(stack, linked, inbox_id, newest, seen, stop), daemon=True)
        watcher.start()
        last_report = [time.monotonic()]

        def report(view: dict[str, Any]) -> None:
            if time.monotonic() - last_report[0] > 10:
                last_report[0] = time.monotonic()
                sync = view.get("sync") or {}
                say(f"  status {view.get('status')}: {sync.get('messages_indexed', '?')} indexed, "
                    f"{sync.get('folders_done', '?')}/{sync.get('folders_total', '?')} folders")

        synced_at = stack.wait_status(linked, "synced", timeout_s=args.timeout_s, on_poll=report)
        watcher.join(timeout=30)
        stop.set()
        elapsed = synced_at - linked.callback_started
        served = stack.sandbox.counters()
        storage: dict[str, float] = {}
        if stack.storage_counter is not None:
            used = diff_counts(stack.storage_counter.snapshot(), storage0)
            say(f"storage transactions during the sync: {used}")
            storage = {"table_tx": used.get("table_total", 0), "queue_tx": used.get("queue_total", 0)}
        say(f"synced in {elapsed:.1f} s; comparing the store with the mailbox")
        store = stack.store()
        diff = compare(store, linked.account_id, stack.sandbox.snapshot(address))
        store.close()
        bound = max(gbound, ceiling.elapsed_s)
        first_50 = seen["first_50"] - linked.callback_started if "first_50" in seen else float("nan")
        stack.watch.stop()
        return {
            "messages": total, "folders": folders, "latency_ms": args.latency_ms, "page_size": args.page_size,
            "elapsed_s": elapsed, "bound_s": bound, "graph_bound_s": gbound, "store_bound_s": ceiling.elapsed_s,
            "ratio_to_bound": elapsed / bound if bound else float("nan"), "first_50_s": first_50,
            "messages_per_s": total / elapsed, "store_ceiling_per_s": ceiling.docs_per_s,
            "store_chunk": ceiling.best_chunk, "store_writers": ceiling.writers,
            "source_bytes_per_msg": ceiling.source_bytes_per_msg, "graph_requests": int(served["requests"]),
            "longest_folder_chain_s": chain_s,
            "peak_rss_mb": stack.watch.peak_mb.get("devhost", float("nan")),
            "missing": len(diff.missing), "extra": len(diff.extra), "stale": len(diff.stale), **storage,
            "token_cache": args.token_cache, "time_budget_s": args.time_budget_s,
            "resumes": _log_lines(stack.workdir, "full round resumes"),
            "full_restarts": int(served.get("deltaRestarts", 0)), "delta_expired": int(served.get("deltaExpired", 0)),
        }
    finally:
        stack.stop_and_clean(keep=args.keep)


def _folder_counts(box: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in box.messages:
        counts[message.folder_id] = counts.get(message.folder_id, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--messages", default="20000",
                        help="messages in the mailbox; a comma list runs each on a fresh stack (default 20000)")
    parser.add_argument("--folders", type=int, default=12,
                        help="at least this many folders (empty ones are added if the seeded tree has fewer)")
    parser.add_argument("--latency-ms", type=int, default=100, help="added to every Graph request (default 100)")
    parser.add_argument("--page-size", type=int, default=500, help="the engine's GRAPH_PAGE_SIZE (default 500)")
    parser.add_argument("--seed", type=int, default=42, help="sandbox seed (decides the mailbox)")
    parser.add_argument("--token-cache", type=int, default=3,
                        help="delta links the sandbox keeps per folder, as Outlook's token cache (default 3; 0: off)")
    parser.add_argument("--time-budget-s", type=float, default=20.0,
                        help="the engine's SYNC_TIME_BUDGET_S: paging time per invocation (default 20)")
    parser.add_argument("--store-writers", default="1,4",
                        help="parallel bulk writers tried for the store bound (default 1,4)")
    parser.add_argument("--store-chunks", default="1000,2000",
                        help="bulk chunk sizes tried for the store bound (default 1000,2000)")
    parser.add_argument("--store-sample", type=int, default=3000,
                        help="messages per chunk-size sample (default 5000)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="give up on the sync after this long")
    parser.add_argument("--count-storage", action="store_true",
                        help="count the queue and table transactions of the sync (a counting proxy before Azurite)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.messages.split(",") if s.strip()]
    results = []
    for size in sizes:
        result = run_once(args, size)
        results.append(result)
        print(figures(f"initial_sync_{size}", result), flush=True)
    final = dict(results[-1])
    if len(results) > 1:
        for result in results:
            final[f"peak_rss_mb_{result['messages']}"] = result["peak_rss_mb"]
    print(figures("initial_sync", final), flush=True)
    return 0 if all(r["missing"] == r["extra"] == r["stale"] == r["full_restarts"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
