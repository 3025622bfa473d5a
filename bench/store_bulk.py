"""Bulk upsert throughput of the search store, per bulk chunk size.

Usage::

    .venv/bin/python -m bench.store_bulk [--docs 100000] [--chunk-sizes 250,500,1000,2000]

Starts the embedded search node (OpenSearch, ``search_node/``) on
127.0.0.1 (free port, data in a temp folder) unless ELASTICSEARCH_URL is
set, then for each chunk size loads ``--docs`` realistic messages
(deterministic generator: subjects, senders, recipients, a preview and a
1-4 KB plain or HTML body) through ``SearchStore.upsert_messages``
in batches, into fresh indices, inside ``bulk_load`` as a folder's first
round does (``--refresh default`` loads without it, at the index's normal
1 s refresh, as every later round writes). Timed: document mapping +
serialisation + bulk round trips, i.e. what the sync engine pays. Prints
documents/s per chunk size and a final ``key=value`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import cpu_s, peak_rss_mb, rss_mb
from mailsync.models import Address, FlagStatus, Message
from mailsync.store.engines import connect
from mailsync.store.mappings import IndexNames
from mailsync.store.search_store import SearchStore, StoreOptions

WORDS = (
    "meeting", "report", "budget", "review", "quarterly", "project", "update", "invoice", "contract",
    "deadline", "proposal", "schedule", "travel", "lunch", "team", "customer", "release", "feedback", "agenda",
    "draft", "plan", "launch", "hiring", "offsite", "security", "incident", "renewal", "shipment", "order",
    "payment", "reminder", "question", "thanks", "follow-up", "notes",
)
NAMES = ("Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black", "Frank Green", "Grace Lee",
         "Heidi Klum", "Ivan Petrov", "Judy Chen", "Mallory Stone", "Oscar Diaz", "Peggy Sue", "Trent Reznor")
DOMAINS = ("contoso.com", "fabrikam.com", "example.org", "northwind.net", "adatum.com")
FOLDERS = ("inbox", "inbox", "inbox", "archive", "sentitems", "project-x", "newsletters")


def _person(rng: random.Random) -> Address:
    name = rng.choice(NAMES)
    return Address(f"{name.split()[0].lower()}.{name.split()[1].lower()}@{rng.choice(DOMAINS)}", name)


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def generate(account_id: str, count: int, *, seed: int = 7) -> Iterator[Message]:
    """``count`` realistic messages, the same ones for the same seed."""
    rng = random.Random(seed)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for n in range(count):
        received = start + timedelta(seconds=n * 97 + rng.randrange(90))
        paragraphs = [_sentence(rng, rng.randrange(12, 40)) for _ in range(rng.randrange(3, 12))]
        if rng.random() < 0.6:   # most mail arrives as HTML
            body = "<html><body>" + "".join(f"<p>{p}</p>" for p in paragraphs) + "</body></html>"
        else:
            body = "\n\n".join(paragraphs)
        yield Message(
            account_id=account_id,
            message_id=f"AAMkAD{n:010d}{rng.getrandbits(64):016x}",
            folder_id=rng.choice(FOLDERS),
            version=int(received.timestamp() * 1000) + rng.randrange(1000),
            subject=("RE: " if rng.random() < 0.3 else "") + _sentence(rng, rng.randrange(3, 10)),
            sender=_person(rng),
            to=tuple(_person(rng) for _ in range(rng.randrange(1, 4))),
            cc=tuple(_person(rng) for _ in range(rng.randrange(0, 3))),
            received_at=received,
            sent_at=received - timedelta(seconds=rng.randrange(1, 30)),
            modified_at=received,
            is_read=rng.random() < 0.8,
            flag_status=FlagStatus.FLAGGED if rng.random() < 0.05 else FlagStatus.NOT_FLAGGED,
            importance="high" if rng.random() < 0.05 else "normal",
            categories=("Work",) if rng.random() < 0.1 else (),
            has_attachments=rng.random() < 0.2,
            conversation_id=f"AAQkAD{n // 3:010d}",
            internet_message_id=f"<{n}.{rng.getrandbits(32):08x}@{rng.choice(DOMAINS)}>",
            body_preview=" ".join(paragraphs)[:255],
            body_text=body,
        )


def run(url: str, docs: int, chunk: int, batch: int, chunk_bytes: int, writers: int = 1,
        replicas: int | None = None, bulk: bool = True) -> tuple[float, float, float]:
    """Load ``docs`` messages with bulk chunks of ``chunk`` documents, ``writers`` requests in flight.

    Returns documents/s overall, for the first batch and for the last one
    (the two show whether the server slows down as the index grows).
    """
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    store = SearchStore(connect(url, api_key=os.environ.get("ELASTICSEARCH_API_KEY") or None, request_timeout_s=120),
                        StoreOptions(prefix=prefix, chunk_docs=chunk, chunk_bytes=chunk_bytes, bulk_writers=writers,
                                     replicas=replicas))
    store.ensure_ready()
    account = "bench-account"
    elapsed = 0.0
    written = 0
    rates: list[float] = []
    try:
        with store.bulk_load(account) if bulk else contextlib.nullcontext():
            pending: list[Message] = []
            for message in generate(account, docs):
                pending.append(message)
                if len(pending) == batch:
                    t0 = time.perf_counter()
                    written += store.upsert_messages(pending).written
                    took = time.perf_counter() - t0
                    elapsed += took
                    rates.append(len(pending) / took)
                    pending = []
            if pending:
                t0 = time.perf_counter()
                written += store.upsert_messages(pending).written
                took = time.perf_counter() - t0
                elapsed += took
                rates.append(len(pending) / took)
        store.refresh()
        stored = store.engine.count(store.names.messages, {"match_all": {}})
        if written != docs or stored != docs:
            raise SystemExit(f"chunk {chunk}: wrote {written}, stored {stored}, expected {docs}")
    finally:
        if not KEEP:
            names = IndexNames(prefix)
            store.engine.delete_indices(names.physical_indices)
        store.close()
    return docs / elapsed, rates[0], rates[-1]


KEEP = False   # --keep: leave the last run's index in place (to read the node's memory with it loaded)


def main(argv: list[str] | None = None) -> int:
    global KEEP
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Against a real cluster: ELASTICSEARCH_URL=https://... "
                                            "[ELASTICSEARCH_API_KEY=...] python -m bench.store_bulk")
    parser.add_argument("--docs", type=int, default=100_000, help="messages per run (default 100000)")
    parser.add_argument("--chunk-sizes", default="250,500,1000,2000",
                        help="comma-separated bulk chunk sizes in documents (default 250,500,1000,2000)")
    parser.add_argument("--chunk-bytes", default=str(8 * 1024 * 1024),
                        help="comma-separated bulk chunk byte bounds (default 8 MiB)")
    parser.add_argument("--writers", default="1",
                        help="comma-separated numbers of bulk requests in flight (ELASTICSEARCH_BULK_WRITERS)")
    parser.add_argument("--refresh", default="bulk",
                        help="comma-separated: bulk (inside bulk_load, the relaxed refresh of a first round) "
                             "and/or default (the index's normal refresh)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="load this many messages first, untimed: a fresh node spends most of its first "
                             "~50k documents' CPU compiling (JIT), which would bias whichever run comes first")
    parser.add_argument("--batch", type=int, default=5_000,
                        help="messages per upsert_messages call (default 5000)")
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
    byte_bounds = [int(c) for c in args.chunk_bytes.split(",") if c.strip()]
    writer_counts = [int(c) for c in args.writers.split(",") if c.strip()]
    refreshes = [r.strip() for r in args.refresh.split(",") if r.strip()]
    if not set(refreshes) <= {"bulk", "default"}:
        parser.error("--refresh takes bulk and/or default")

    url = os.environ.get("ELASTICSEARCH_URL")
    server = None
    if not url:
        from devhost.services.search_node import start_search_node

        server = start_search_node(Path(tempfile.mkdtemp(prefix="bench-store-bulk-")) / "search-node")
        url = server.url
    engine = connect(url, api_key=os.environ.get("ELASTICSEARCH_API_KEY") or None)
    version = engine.info().get("version", {})
    engine.close()
    target = f"{engine.name} {version.get('number', '?')}" + ("" if server else " (ELASTICSEARCH_URL)")
    # The embedded single node has nowhere to put a replica (ELASTICSEARCH_REPLICAS=0 there).
    replicas = 0 if server else None
    print(f"store bulk upsert: {args.docs} messages per run against {target}")
    results: dict[str, float] = {}
    node_figures: dict[str, float] = {}
    try:
        if args.warmup:
            run(url, args.warmup, chunks[0], args.batch, byte_bounds[0], writer_counts[0], replicas)
            print(f"  warm-up: {args.warmup} messages loaded (untimed)", flush=True)
        configs = [(c, b, w, r) for r in refreshes for c in chunks for b in byte_bounds for w in writer_counts]
        for n, (chunk, bound, writers, refresh) in enumerate(configs):
            KEEP = server is not None and n == len(configs) - 1
            cpu0 = cpu_s(server.process.pid) if server else None
            rate, first, last = run(url, args.docs, chunk, args.batch, bound, writers, replicas, refresh == "bulk")
            key = f"{chunk}x{bound // 1024}kx{writers}" + ("" if refresh == "bulk" else "_refresh_default")
            results[key] = rate
            node = ""
            if server is not None and cpu0 is not None:
                cpu = (cpu_s(server.process.pid) or 0.0) - cpu0
                node_figures[f"node_cpu_us_per_doc_{key}"] = 1e6 * cpu / args.docs
                node = f", node CPU {1e6 * cpu / args.docs:,.0f} us/doc"
            print(f"  chunk={chunk:>5} docs, <= {bound // 1024:>6} KiB, {writers} writer(s), refresh {refresh:>7}"
                  f"  {rate:>9,.0f} documents/s"
                  f"   (first batch {first:,.0f}/s, last batch {last:,.0f}/s{node})", flush=True)
        if server is not None:
            # The last run's index is still loaded: the node's memory with args.docs messages in it.
            node_figures["node_rss_mb"] = rss_mb(server.process.pid) or 0.0
            node_figures["node_peak_rss_mb"] = peak_rss_mb(server.process.pid) or 0.0
            node_figures["node_data_mb"] = sum(f.stat().st_size for f in server.data.rglob("*") if f.is_file()) / 2**20
            print(f"  node with {args.docs:,} messages loaded: RSS {node_figures['node_rss_mb']:,.0f} MB "
                  f"(peak {node_figures['node_peak_rss_mb']:,.0f} MB, heap -Xmx1g), "
                  f"data on disk {node_figures['node_data_mb']:,.0f} MB")
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.home, ignore_errors=True)
    best = max(results, key=results.__getitem__)
    print(f"store_bulk server={engine.name} docs={args.docs} "
          + " ".join(f"{k}_docs_per_s={r:.0f}" for k, r in results.items())
          + f" best={best} best_docs_per_s={results[best]:.0f} "
          + " ".join(f"{k}={v:.0f}" for k, v in node_figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
