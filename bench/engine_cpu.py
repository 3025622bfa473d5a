"""The engine's per-message CPU, isolated: mapping, store documents and bulk encoding.

Usage::

    .venv/bin/python bench/engine_cpu.py --messages 20000

No servers: the Graph sandbox's own generator builds a realistic mailbox in
this process and renders each message as Graph returns it to our provider
(``$select`` of the provider's fields, text bodies), encoded to JSON
bytes as on the wire. Then, per message, the stages an initial sync runs
are timed separately (best of ``--repeat`` rounds, process CPU time):

* ``parse_us``: the page's JSON bytes → Python (orjson);
* ``map_us``: Graph JSON → ``Message`` (``providers.graph.map_message``);
* ``document_us``: ``Message`` → store document (``store.documents``);
* ``encode_us``: the store's bulk actions → one NDJSON body per chunk
  (``BulkWriter.chunks``, what is sent to ``_bulk``).

``total_us`` is their sum. Less noisy than bench/pipeline.py, which also
counts HTTP, table and queue calls and is the figure of record.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import parser_from_doc
from graph_sandbox import payloads
from graph_sandbox.config import SandboxConfig
from graph_sandbox.mailbox import Mailboxes
from graph_sandbox.seed import seed_tenant
from graph_sandbox.state import SandboxClock
from mailsync.providers.graph import MESSAGE_FIELDS, map_message
from mailsync.store import documents as docs
from mailsync.store.search_store import SearchStore, StoreOptions


def graph_pages(messages: int, seed: int, page_size: int = 500) -> list[bytes]:
    """The mailbox's messages as Graph delta pages (JSON bytes), as our provider asks for them."""
    config = SandboxConfig(users=1, messages_per_user=messages, seed=seed)
    box = seed_tenant(config, Mailboxes(SandboxClock())).mailboxes[0]
    select = payloads.message_select((*MESSAGE_FIELDS, "body"))
    items = [payloads.message(m, box, immutable=True, select=select, text_body=True)
             for m in box.all_messages()]
    return [orjson.dumps({"value": items[i:i + page_size]}) for i in range(0, len(items), page_size)]


def cpu_best(stage: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The least process CPU time of ``repeat`` runs of ``stage`` (GC off while timing) and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        started = time.process_time()
        result = stage()
        best = min(best, time.process_time() - started)
        gc.enable()
    return best, result


def run(args: argparse.Namespace) -> dict[str, Any]:
    pages = graph_pages(args.messages, args.seed)
    store = SearchStore(engine=None, options=StoreOptions())  # type: ignore[arg-type]   # encodes only
    observed_ms = int(datetime(2026, 11, 2, 10, tzinfo=UTC).timestamp() * 1000)
    parse_s, parsed = cpu_best(lambda: [orjson.loads(p)["value"] for p in pages], args.repeat)
    items = [item for page in parsed for item in page]
    total = len(items)
    map_s, mapped = cpu_best(lambda: [map_message(i, "acct1", i["parentFolderId"], 32_000, observed_ms)
                                      for i in items], args.repeat)
    indexed_at = docs.now_iso()
    policy = docs.BodyPolicy()
    doc_s, documents = cpu_best(lambda: [docs.message_to_document(m, epoch=1, body=policy, indexed_at=indexed_at)
                                         for m in mapped], args.repeat)

    def encode() -> int:
        actions = [store.message_action(docs.message_doc_id(m.account_id, m.message_id), m, d)
                   for m, d in zip(mapped, documents, strict=True)]
        return sum(len(chunk) for chunk in store.bulk_writer.chunks(actions))

    encode_s, _ = cpu_best(encode, args.repeat)
    stages = {"parse_us": parse_s, "map_us": map_s, "document_us": doc_s, "encode_us": encode_s}
    result: dict[str, Any] = {"messages": total}
    result.update({name: 1e6 * seconds / total for name, seconds in stages.items()})
    result["total_us"] = sum(1e6 * seconds / total for seconds in stages.values())
    result["graph_bytes_per_msg"] = sum(len(p) for p in pages) / total
    return result


def main(argv: list[str] | None = None) -> int:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="messages in the mailbox (default 20000)")
    parser.add_argument("--seed", type=int, default=42, help="sandbox seed (decides the mailbox)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per stage; the best is kept (default 5)")
    args = parser.parse_args(argv)
    result = run(args)
    print("engine_cpu " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
