"""The chaos run: initial sync + continuous mutations, every fault on, workers killed; then settle and compare.

Usage::

    .venv/bin/python bench/chaos.py --messages 20000 --duration 300

On a local stack (Azurite, the search node (OpenSearch), the Graph sandbox, all on
127.0.0.1):

* the Graph sandbox runs the ``chaos`` fault profile — every fault it
  has, at once: 429 storms, 503/504, slow and truncated responses, expired
  delta tokens (410), replayed delta pages, and dropped / duplicated /
  delayed / reordered notifications and ``missed`` lifecycle events;
* one devhost runs the HTTP functions, the webhook and the timers (not the
  queue trigger); ``--workers`` more devhosts run only the queue trigger,
  and every ``--kill-every`` seconds (randomised) one of them is killed with
  SIGKILL mid-whatever and a new one started;
* the account is linked through the real sign-in flow and, from the
  moment its initial sync starts, the mailbox changes ``--rate`` times a
  second (read/unread, flag, categories, move, delete, new mail — the
  sandbox's churn, which notifies like any change) plus folder create /
  rename / delete through Graph now and then.

After ``--duration`` seconds the mutations and the kills stop (the faults
stay on) and the store is compared with the sandbox's ground truth until
they are equal or ``--settle-timeout`` passes. Prints ``missing``,
``extra``, ``stale`` (goal 0 / 0 / 0) and ``settle_s`` (from the last
mutation to equality), plus what was done to the system.

Settings this run changes, and why: the workers' queue lease is
``--queue-lease-s`` (default 15 s; Azure renews a running message's
invisibility, the devhost's default is 60 s) so a killed worker's message
comes back within the run; ``POLL_INTERVAL_SUBSCRIBED_S`` is
``--sweep-s`` (default 60 s; production default 6 h) because a dropped
notification is, by design, only repaired by the next safety sweep.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import parser_from_doc
from bench.harness import (
    BackgroundLoop,
    Diff,
    Stack,
    compare,
    figures,
    say,
    start_stack,
)

HOST_FUNCTIONS_EXCLUDED = {"sync_worker"}


def host_functions(env: dict[str, str]) -> list[str]:
    """Every function of the app except the queue trigger (the main host must not be killed)."""
    import os

    from devhost.index import index_app, load_app

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        specs = index_app(load_app("function_app:app"), env)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return [spec.name for spec in specs if spec.name not in HOST_FUNCTIONS_EXCLUDED]


class Mutator(BackgroundLoop):
    """Changes the mailbox as a busy user would, ``rate`` times a second, until stopped."""

    thread_name = "bench-mutator"

    def __init__(self, stack: Stack, address: str, rate: float, rng: random.Random) -> None:
        self.stack = stack
        self.address = address
        self.rate = rate
        self.rng = rng
        self.changes = 0
        self.folder_ops = 0
        self.failed = 0
        self.last_change = time.monotonic()
        self._created: list[str] = []
        super().__init__()

    def _run(self) -> None:
        graph = self.stack.sandbox.graph(self.address)
        batch = max(1, int(self.rate))   # one churn call per second carries `rate` changes
        while not self._stop.wait(batch / self.rate):
            try:
                done = self.stack.sandbox.admin("POST", f"mailboxes/{self.address}/churn",
                                                json={"operations": batch, "seed": self.rng.getrandbits(32)})
                self.changes += len(done["operations"])
                self.last_change = time.monotonic()
                if self.rng.random() < 0.1:
                    self._folder_op(graph)
            except Exception as exc:   # keep mutating: the run is about the system, not this thread
                self.failed += 1
                say(f"  mutation failed: {exc}")

    def _folder_op(self, graph: Any) -> None:
        roll = self.rng.random()
        if roll < 0.5 or not self._created:
            answer = _retry(lambda: graph.post("me/mailFolders",
                                               json={"displayName": f"Chaos {self.rng.getrandbits(24):06x}"}))
            if answer is not None and answer.status_code == 201:
                self._created.append(answer.json()["id"])
        elif roll < 0.8:
            folder = self.rng.choice(self._created)
            answer = _retry(lambda: graph.patch(f"me/mailFolders/{folder}",
                                                json={"displayName": f"Renamed {self.rng.getrandbits(24):06x}"}))
        else:
            folder = self._created.pop(self.rng.randrange(len(self._created)))
            answer = _retry(lambda: graph.delete(f"me/mailFolders/{folder}"))
        if answer is not None and answer.status_code < 300:
            self.folder_ops += 1
            self.last_change = time.monotonic()


def _retry(call: Any, attempts: int = 5) -> Any:
    """A Graph write through the faults: retry throttling, 5xx and cut connections."""
    answer = None
    for attempt in range(attempts):
        try:
            answer = call()
        except Exception:
            time.sleep(0.5 * (attempt + 1))
            continue
        if answer.status_code in (429, 503, 504):
            time.sleep(min(5.0, float(answer.headers.get("Retry-After") or 1)))
            continue
        return answer
    return answer


class Killer(BackgroundLoop):
    """Kills a random sync worker every ``every_s`` (+-50 %) and starts a new one."""

    thread_name = "bench-killer"

    def __init__(self, stack: Stack, every_s: float, rng: random.Random, lease_s: float) -> None:
        self.stack = stack
        self.every_s = every_s
        self.rng = rng
        self.lease_s = lease_s
        self.kills = 0
        super().__init__()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s * (0.5 + self.rng.random())):
            if not self.stack.workers:
                continue
            victim = self.rng.choice(self.stack.workers)
            self.stack.kill_worker(victim)
            self.kills += 1
            say(f"  killed worker pid {victim.pid} (kill {self.kills})")
            try:
                self.stack.add_worker(self.lease_s)
            except Exception as exc:
                say(f"  could not start a replacement worker: {exc}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    env = {"POLL_INTERVAL_SUBSCRIBED_S": str(args.sweep_s), "GRAPH_PAGE_SIZE": str(args.page_size)}
    stack = start_stack("chaos", users=1, messages=args.messages, latency_ms=args.latency_ms, seed=args.seed,
                        env=env, start_host=False)
    try:
        stack.start_host(host_functions(stack.env))
        for _ in range(args.workers):
            stack.add_worker(args.queue_lease_s)
        address = stack.sandbox.users()[0]["mail"]
        stack.sandbox.faults(args.faults, seed=args.seed)
        say(f"fault profile {args.faults} on; {args.workers} sync workers; linking {address}")
        stack.sandbox.reset_counters()
        linked = stack.link(address)
        started = time.monotonic()
        mutator = Mutator(stack, address, args.rate, random.Random(rng.getrandbits(32)))
        killer = Killer(stack, args.kill_every, random.Random(rng.getrandbits(32)), args.queue_lease_s)
        mutator.start()
        killer.start()
        synced_at: float | None = None
        while time.monotonic() - started < args.duration:
            time.sleep(5)
            try:
                view = stack.account(linked)
            except Exception as exc:
                say(f"  status read failed: {exc}")
                continue
            if synced_at is None and view.get("status") == "synced":
                synced_at = time.monotonic()
            sync = view.get("sync") or {}
            say(f"  {view.get('status')}: {sync.get('messages_indexed', '?')} indexed, "
                f"{sync.get('folders_done', '?')}/{sync.get('folders_total', '?')} folders; "
                f"{mutator.changes} changes, {killer.kills} kills")
        killer.stop()
        mutator.stop()
        calm_from = mutator.last_change
        say(f"mutations and kills stopped ({mutator.changes} changes, {mutator.folder_ops} folder operations, "
            f"{killer.kills} kills); faults stay on; waiting for the store to equal the mailbox")
        store = stack.store()
        diff: Diff | None = None
        settled_at: float | None = None
        deadline = time.monotonic() + args.settle_timeout
        while time.monotonic() < deadline:
            try:
                diff = compare(store, linked.account_id, stack.sandbox.snapshot(address))
            except Exception as exc:
                say(f"  compare failed: {exc}")
                time.sleep(5)
                continue
            if not diff:
                settled_at = time.monotonic()
                break
            say(f"  not yet: {diff.summary()}")
            time.sleep(args.check_every)
        if synced_at is None:
            try:
                if stack.account(linked).get("status") == "synced":
                    synced_at = time.monotonic()
            except Exception:
                pass
        if diff:
            for mid, got, want in diff.stale[:5]:
                say(f"  stale {mid}: store {got} mailbox {want}")
            say(f"  missing e.g. {diff.missing[:3]}, extra e.g. {diff.extra[:3]}")
        counters = stack.sandbox.counters()
        faults = stack.sandbox.admin("GET", "faults")
        store.close()
        assert diff is not None
        return {
            "messages": args.messages, "duration_s": args.duration, "changes": mutator.changes,
            "folder_ops": mutator.folder_ops, "kills": killer.kills, "faults_injected": faults.get("injected", 0),
            "graph_requests": counters.get("requests", 0),
            "initial_sync_s": (synced_at - started) if synced_at else float("nan"),
            "missing": len(diff.missing), "extra": len(diff.extra), "stale": len(diff.stale),
            "folders_missing": len(diff.folders_missing), "folders_extra": len(diff.folders_extra),
            "settle_s": (settled_at - calm_from) if settled_at else float("nan"),
        }
    finally:
        stack.stop_and_clean(keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="messages in the mailbox (default 20000)")
    parser.add_argument("--duration", type=float, default=300, help="seconds of mutations and kills (default 300)")
    parser.add_argument("--rate", type=float, default=5, help="mailbox changes per second (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="killable sync workers (default 2)")
    parser.add_argument("--kill-every", type=float, default=30, help="mean seconds between kills (default 30)")
    parser.add_argument("--faults", default="chaos", help="sandbox fault profile (default chaos: all of them)")
    parser.add_argument("--latency-ms", type=int, default=0, help="added to every Graph request (default 0)")
    parser.add_argument("--page-size", type=int, default=500, help="the engine's GRAPH_PAGE_SIZE (default 500)")
    parser.add_argument("--queue-lease-s", type=float, default=15, help="workers' queue lease (default 15)")
    parser.add_argument("--sweep-s", type=int, default=60,
                        help="POLL_INTERVAL_SUBSCRIBED_S: safety sweep of subscribed accounts (default 60)")
    parser.add_argument("--settle-timeout", type=float, default=900, help="give up settling after this long")
    parser.add_argument("--check-every", type=float, default=10, help="seconds between comparisons while settling")
    parser.add_argument("--seed", type=int, default=7, help="seed of the mailbox, faults, mutations and kills")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)
    result = run(args)
    print(figures("chaos", result), flush=True)
    return 0 if result["missing"] == result["extra"] == result["stale"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
