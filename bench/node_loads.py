"""The search node's CPU per document over a fresh node's first loads, per set of JVM flags.

Usage::

    .venv/bin/python bench/node_loads.py [--loads 4] [--jvm= --jvm=-XX:TieredStopAtLevel=4]

For each ``--jvm`` flag set (appended after the launcher's own JVM_FLAGS,
so a later ``-XX`` flag wins; ``--jvm=`` is the launcher as it is), starts a
fresh embedded node (``--jvm=-XX:TieredStopAtLevel=4`` brings C2 back) and loads the ``../shared/imap-bench`` mailbox's
20,000 messages into it ``--loads`` times, each time into fresh indices:
the records the IMAP provider makes of them (``map_message`` on the
Maildir files), written through ``upsert_messages`` inside ``bulk_load``
(the 30 s refresh of a first round), one stream per folder, 1,000 per
bulk. Per load it prints the node's CPU per document (``/proc``, with the
merges of the 3 s after the load) and how much of it the JIT compiler's
threads took (``jcmd Thread.print``): what bench/README.md's "IMAP initial
sync: the node's compiler" table shows. The final line is
``node_loads key=value ...`` (``<set>_load<n>_us_per_doc``,
``<set>_load<n>_jit_us_per_doc``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import figures, remove_workdir, say, tree_cpu_s
from bench.imap_initial_sync import FOLDERS, GENMAIL, node_thread_cpu_s
from devhost.services.search_node import start_search_node
from mailsync.models import Message
from mailsync.providers.imap import PREVIEW_BYTES, message_id_of
from mailsync.providers.imap_mapping import AddressCache, map_message
from mailsync.store.engines import connect
from mailsync.store.search_store import SearchStore, StoreOptions

ACCOUNT = "nodeloads"
# Maildir info flags (":2,FS") as IMAP flags.
_FLAGS = {"S": b"\\Seen", "F": b"\\Flagged", "D": b"\\Draft", "R": b"\\Answered"}


def mailbox_records(root: Path) -> dict[str, list[Message]]:
    """Per folder, the records the IMAP provider makes of genmail's Maildir (UIDs in file-name order)."""
    addresses = AddressCache()
    found: dict[str, list[Message]] = {}
    for folder in FOLDERS:
        directory = root if folder == "INBOX" else root / f".{folder}"
        records = []
        for uid, path in enumerate(sorted((directory / "cur").iterdir()), start=1):
            raw = path.read_bytes()
            header, _, text = raw.partition(b"\r\n\r\n")
            flags = tuple(_FLAGS[f] for f in path.name.rsplit(",", 1)[-1] if f in _FLAGS)
            records.append(map_message(
                account_id=ACCOUNT, folder_id=folder, message_id=message_id_of(folder, 1, uid), version=uid,
                flags=flags, internal_date=datetime.fromtimestamp(path.stat().st_mtime, UTC),
                header_block=header + b"\r\n\r\n", text=text[:PREVIEW_BYTES], addresses=addresses))
        found[folder] = records
    return found


def load(url: str, records: dict[str, list[Message]]) -> None:
    """One load into fresh indices (deleted afterwards), one stream per folder, as a first sync writes."""
    store = SearchStore(connect(url, request_timeout_s=300), StoreOptions(prefix=f"nl{uuid.uuid4().hex[:8]}",
                                                                          replicas=0))
    store.ensure_ready()

    def stream(messages: Sequence[Message]) -> None:
        for start in range(0, len(messages), 1000):
            result = store.upsert_messages(messages[start:start + 1000], epoch=1)
            if result.failed_ids:
                raise RuntimeError(f"the node refused {len(result.failed_ids)} document(s)")

    try:
        with store.bulk_load(ACCOUNT, "node_loads"), ThreadPoolExecutor(len(records)) as pool:
            list(pool.map(stream, records.values()))
    finally:
        names = store.names
        store.engine.delete_indices([names.messages_index, names.mailboxes_index, names.deadletter_index,
                                     names.actions_index])
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=4)
    parser.add_argument("--jvm", action="append", default=None,
                        help="a set of JVM flags, space-separated, given as --jvm=FLAGS (repeatable; "
                             "--jvm= is the launcher as it is)")
    args = parser.parse_args()
    flag_sets = args.jvm if args.jvm is not None else [""]
    workdir = Path(tempfile.mkdtemp(prefix="bench-node-loads-"))
    values: dict[str, object] = {}
    try:
        say(f"generating the mailbox with {GENMAIL}")
        subprocess.run([sys.executable, str(GENMAIL), str(workdir / "mail")], check=True, stdout=subprocess.DEVNULL)
        records = mailbox_records(workdir / "mail")
        total = sum(len(r) for r in records.values())
        for number, flags in enumerate(flag_sets):
            name = f"set{number}"
            node = start_search_node(workdir / f"node{number}", jvm_flags=flags.split())
            try:
                pid = node.process.pid
                say(f"{name} ({flags or 'the launcher as it is'}): start-up CPU {tree_cpu_s(pid):.1f} s")
                for n in range(args.loads):
                    threads0, cpu0 = node_thread_cpu_s(pid) or {}, tree_cpu_s(pid)
                    started = time.monotonic()
                    load(node.url, records)
                    elapsed = time.monotonic() - started
                    time.sleep(3.0)   # the merges a load leaves behind are its cost too
                    cpu = tree_cpu_s(pid) - cpu0
                    jit = (node_thread_cpu_s(pid) or {}).get("jit", 0.0) - threads0.get("jit", 0.0)
                    values[f"{name}_load{n}_us_per_doc"] = round(cpu / total * 1e6)
                    values[f"{name}_load{n}_jit_us_per_doc"] = round(jit / total * 1e6)
                    say(f"  load {n}: node {cpu / total * 1e6:.0f} us per document (compiler threads "
                        f"{jit / total * 1e6:.0f}), {total / elapsed:,.0f} documents/s")
            finally:
                node.stop()
    finally:
        remove_workdir(workdir)
    print(figures("node_loads", values), flush=True)


if __name__ == "__main__":
    main()
