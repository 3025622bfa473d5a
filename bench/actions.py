"""Actions from mailsync to the mailbox: the optimistic row, the live channel, the provider, 500 marked read at once.

Usage::

    .venv/bin/python bench/actions.py                       # 100 ms sandbox latency, 20 single actions
    .venv/bin/python bench/actions.py --latency-ms 0 --actions 50 --skip-imap

Outlook, on a local stack (bench/harness.py: Azurite, the search node, the
Graph sandbox with ``--latency-ms`` on every request, the devhost running
the whole app): one sandbox user is linked and synced, and a SignalR client
connects the way the page does (``POST /api/negotiate``, the hub's
WebSocket), standing for a second browser on the account. Then:

1. ``--actions`` single ``PATCH /api/accounts/{id}/messages/{mid}`` (read,
   unread, flag in turn), one at a time. ``optimistic_ms``: request sent →
   202 with the row as it will look (the acting page patches its list
   before sending; the 202 settles it). ``live_ms``: request sent → the
   first ``messagesChanged`` naming the message at the SignalR client.
   ``provider_ms``: request sent → the sandbox's own state (its admin
   snapshot, no latency) has the change (the ACTION job through the queue,
   a ``$batch`` to Graph).
2. ``POST …/messages/actions`` marking 500 unread messages read:
   ``bulk_accept_ms`` (the 202) and ``bulk_provider_s`` until the sandbox
   has all 500 read. ``bulk_bound_s`` is the issue's ceil(500 / 20 / 4) x
   latency: 25 batches, four in flight at once (the job holds the
   mailbox's four request slots and chains each batch with ``dependsOn``,
   so each holds one slot at a time), each one round trip (the sandbox
   charges the latency once per HTTP request and ``--execution-ms``, 0
   here, per item). ``batch_bound_s`` = 25 x latency is what one batch at
   a time would allow.

``--trace`` hosts the app in this process instead and prints, per PATCH
and for the bulk action, when each store, ledger, table, queue and Graph call
of the request (and of its ACTION job) started and ended, relative to the
request's send time (bench/call_spans.py): where the time before the 202
goes. Its figures are not the goal lines' (the app shares this process).

IMAP (unless ``--skip-imap``): a Dovecot (tests/fixtures/dovecot.py) user
with 520 messages in INBOX, ``MessageActions`` for IMAP marking 500 unread
ones read: ``imap_bulk_ms`` and the commands it sent (``imap_stores``:
UID STORE commands; the goal is one).

Goals: optimistic p99 < 100 ms, live p99 < 100 ms, provider p50 < 1 s at
100 ms latency; 500 read ≤ bulk_bound_s plus overhead on Graph, one STORE
on IMAP.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.call_spans import CallSpans, timeline
from bench.change_latency import Account as ClientAccount
from bench.change_latency import Clients
from bench.cli import parser_from_doc
from bench.harness import Stack, figures, percentile, say, start_stack
from mailsync.actions.models import MessageAction
from mailsync.providers.imap_actions import ImapActions
from mailsync.providers.imap_session import ImapSession
from tests.fixtures.dovecot import start_dovecot
from tests.providers.imap_harness import make_harness

_COMMAND = re.compile(rb"^[A-Z]{4}\d+ ((?:UID )?[A-Za-z]+)")


def _truth(stack: Stack, address: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in stack.sandbox.snapshot(address)["messages"]}


def _install_spans() -> CallSpans:
    """Spans around the calls a PATCH, a bulk action and their ACTION jobs make (``--trace``)."""
    from devhost.bindings import Bindings
    from mailsync.actions.service import MessageActionService
    from mailsync.linking.access import AccountAccess
    from mailsync.providers.graph_actions import GraphActions
    from mailsync.storage.job_queue import AzureJobQueue
    from mailsync.storage.sync_table import SyncStateTable
    from mailsync.store.action_ledger import SearchActionLedger
    from mailsync.store.search_store import SearchStore

    spans = CallSpans()
    spans.wrap(AccountAccess, "authenticate")
    spans.wrap(SearchStore, "get_message", "get_messages", "upsert_messages", "raise_epoch", "remove_messages",
               "list_folders")
    spans.wrap(SearchActionLedger, "claim", "latest", "put_batch", "get_batch", "drop_batch", "release")
    spans.wrap(SyncStateTable, "epochs", "acquire_slot", "acquire_slots", "release_slot")
    spans.wrap(AzureJobQueue, "enqueue")
    spans.wrap(MessageActionService, "update", "bulk", "run_job")
    spans.wrap(GraphActions, "apply", "_batch")
    spans.wrap_async(Bindings, "write")
    return spans


def _print_steps(spans: CallSpans, function: str, windows: list[tuple[float, float]]) -> None:
    """Per call name: how many, p50 start and end after the request was sent, p50 duration."""
    offsets: dict[str, list[tuple[float, float, float]]] = {}
    for started, answered in windows:
        for span in spans.of(function, started, answered):
            offsets.setdefault(span.name, []).append(((span.started - started) * 1000,
                                                      (span.ended - started) * 1000, span.ms))
    for name, values in sorted(offsets.items(), key=lambda kv: percentile([v[0] for v in kv[1]], 0.5)):
        say(f"  {function} {name}: n={len(values)} start p50 {percentile([v[0] for v in values], 0.5):.1f} "
            f"end p50 {percentile([v[1] for v in values], 0.5):.1f} took p50 "
            f"{percentile([v[2] for v in values], 0.5):.1f} ms")


def outlook(args: Any) -> dict[str, Any]:
    with start_stack("actions", messages=args.messages, latency_ms=args.latency_ms,
                     start_host=not args.trace) as stack:
        if args.trace:
            args.spans = _install_spans()
            stack.start_host_in_process()
        address = stack.sandbox.users()[0]["mail"]
        linked = stack.link(address)
        stack.wait_status(linked, "synced", timeout_s=900)
        stack.wait_quiet(timeout_s=300)
        clients = Clients(stack.api)
        clients.connect_all([ClientAccount(linked)])
        try:
            return _outlook_figures(args, stack, address, linked, clients)
        finally:
            clients.close()


def _outlook_figures(args: Any, stack: Stack, address: str, linked: Any, clients: Clients) -> dict[str, Any]:
    http = requests.Session()
    http.headers.update(linked.auth)
    base = f"{stack.api}/accounts/{linked.account_id}/messages"
    truth = _truth(stack, address)
    ids = sorted(truth)
    optimistic: list[float] = []
    live: list[float] = []
    provider: list[float] = []
    windows: list[tuple[float, float]] = []
    spans: CallSpans | None = getattr(args, "spans", None)
    for n in range(args.actions):
        mid = ids[n]
        change: dict[str, Any] = ({"is_read": not truth[mid]["isRead"]} if n % 2 == 0
                                  else {"flag_status": "notFlagged" if truth[mid]["flagStatus"] == "flagged"
                                        else "flagged"})
        started = time.monotonic()
        answer = http.patch(f"{base}/{mid}", json=change, timeout=30)
        optimistic.append((time.monotonic() - started) * 1000)
        if answer.status_code != 202:
            raise SystemExit(f"PATCH answered {answer.status_code}: {answer.text[:300]}")
        key, want = (("isRead", change["is_read"]) if "is_read" in change
                     else ("flagStatus", change["flag_status"]))
        reached: float | None = None
        seen: float | None = None
        while reached is None or seen is None:
            if reached is None and _truth(stack, address)[mid][key] == want:
                reached = time.monotonic()
            if seen is None:
                seen = clients.first_after(linked.account_id, mid, started)
            if time.monotonic() - started > 60:
                raise SystemExit(f"no change at the provider or on the live channel for {mid}")
            time.sleep(0.005)
        provider.append((reached - started) * 1000)
        live.append((seen - started) * 1000)
        windows.append((started, started + optimistic[-1] / 1000))
        if spans is not None:
            say(f"PATCH {n}: 202 {optimistic[-1]:.0f} live {live[-1]:.0f} provider {provider[-1]:.0f} ms: "
                + timeline(spans.of("message_update", started, windows[-1][1]), started))
            say("  its job: " + timeline([s for s in spans.of("sync_worker", started, reached)], started))
    if spans is not None:
        _print_steps(spans, "message_update", windows)
    say(f"single actions: optimistic p50 {percentile(optimistic, 0.5):.0f} ms, live p50 "
        f"{percentile(live, 0.5):.0f} ms, provider p50 {percentile(provider, 0.5):.0f} ms")

    stack.wait_quiet(timeout_s=120)
    batch = ids[:500]
    # Start from 500 unread (through the same API, then wait until Outlook has them all).
    prepared = http.post(f"{base}/actions", json={"message_ids": batch, "action": {"is_read": False}}, timeout=60)
    if prepared.status_code != 202:
        raise SystemExit(f"bulk answered {prepared.status_code}: {prepared.text[:300]}")
    wanted = set(batch)
    while not all(not m["isRead"] for mid, m in _truth(stack, address).items() if mid in wanted):
        time.sleep(0.2)
    stack.wait_quiet(timeout_s=300)
    before = stack.sandbox.admin("GET", "counters")
    started = time.monotonic()
    answer = http.post(f"{base}/actions", json={"message_ids": batch, "action": {"is_read": True}}, timeout=60)
    accepted_ms = (time.monotonic() - started) * 1000
    if answer.status_code != 202:
        raise SystemExit(f"bulk answered {answer.status_code}: {answer.text[:300]}")
    while True:
        now = _truth(stack, address)
        if all(now[mid]["isRead"] for mid in batch if mid in now):
            break
        if time.monotonic() - started > 600:
            raise SystemExit("the sandbox never had all 500 read")
        time.sleep(0.1)
    bulk_s = time.monotonic() - started
    if spans is not None:
        say("bulk POST: " + timeline(spans.of("message_actions", started, started + accepted_ms / 1000), started))
        time.sleep(3)       # the job's own spans end after the sandbox has the 500 (its confirm reads)
        say("bulk job: " + timeline(spans.of("sync_worker", started, started + bulk_s), started))
    after = stack.sandbox.admin("GET", "counters")
    latency_s = args.latency_ms / 1000
    return {
        "latency_ms": args.latency_ms, "actions": args.actions,
        "optimistic_p50_ms": round(percentile(optimistic, 0.5), 1),
        "optimistic_p99_ms": round(percentile(optimistic, 0.99), 1),
        "live_p50_ms": round(percentile(live, 0.5), 1), "live_p99_ms": round(percentile(live, 0.99), 1),
        "provider_p50_ms": round(percentile(provider, 0.5), 1),
        "provider_p99_ms": round(percentile(provider, 0.99), 1),
        "bulk_messages": len(batch), "bulk_accept_ms": round(accepted_ms, 1),
        "bulk_provider_s": round(bulk_s, 2),
        # Graph requests (a $batch item counts as one) and 429s while the 500 went through: the sync rounds
        # the changes trigger share the mailbox's 4 concurrent requests with the batches.
        "bulk_graph_requests": after["requests"] - before["requests"],
        "bulk_throttled": after["throttled"] - before["throttled"],
        "bulk_delta_pages": after["deltaPages"] - before["deltaPages"],
        "bulk_bound_s": round(math.ceil(len(batch) / 20 / 4) * latency_s, 2),
        "batch_bound_s": round(math.ceil(len(batch) / 20) * latency_s, 2),
    }


def imap() -> dict[str, Any]:
    """500 marked read on Dovecot through ``ImapActions``, counting the IMAP commands sent."""
    server = start_dovecot(pool=2)
    try:
        harness = make_harness(server, folders={"INBOX": 520, "Trash": 0})
        commands: Counter[str] = Counter()

        def connect() -> ImapSession:
            session = harness.connect()
            wire = session.client._imap
            send = wire.send

            def counted(data: bytes) -> None:
                # Every command line goes out through send(): "<tag> [UID ]<COMMAND> ..." (literals do not match).
                sent = _COMMAND.match(data)
                if sent:
                    commands[sent.group(1).decode().upper()] += 1
                send(data)

            wire.send = counted
            return session

        actions = ImapActions(connect, harness.account_id)
        try:
            inbox = sorted(mid for mid, m in harness.messages().items() if m.folder_id == "INBOX")[:500]
            actions.apply([MessageAction(mid, "INBOX", is_read=False) for mid in inbox])
            commands.clear()
            started = time.monotonic()
            outcomes = actions.apply([MessageAction(mid, "INBOX", is_read=True) for mid in inbox])
            elapsed_ms = (time.monotonic() - started) * 1000
            during = Counter(commands)
        finally:
            actions.close()
        truth = harness.messages()
        read = sum(1 for mid in inbox if truth[mid].is_read)
        say(f"IMAP: 500 read in {elapsed_ms:.0f} ms, commands {dict(during)}")
        return {"imap_bulk_messages": len(inbox), "imap_bulk_done": sum(o.done for o in outcomes),
                "imap_bulk_read": read, "imap_bulk_ms": round(elapsed_ms, 1),
                "imap_stores": during.get("UID STORE", 0), "imap_commands": sum(during.values())}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--latency-ms", type=int, default=100, help="Graph sandbox latency per request")
    parser.add_argument("--actions", type=int, default=20, help="single PATCHes, one at a time")
    parser.add_argument("--messages", type=int, default=800, help="messages in the sandbox user's mailbox")
    parser.add_argument("--skip-imap", action="store_true", help="only the Outlook part")
    parser.add_argument("--skip-outlook", action="store_true", help="only the IMAP part")
    parser.add_argument("--trace", action="store_true",
                        help="host the app in this process and print where each request's time goes")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if not args.skip_imap:
        values.update(imap())
    if not args.skip_outlook:
        values.update(outlook(args))
    print(figures("actions", values))


if __name__ == "__main__":
    main()
