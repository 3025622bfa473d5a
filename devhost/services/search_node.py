"""The embedded search node: a real single-node OpenSearch (Lucene on disk), built from search_node/.

search_node/ is a Maven project (a pom with exact versions and one launcher
class); ``mvn package`` puts our class in ``target/classes`` and every
resolved jar in ``target/lib``. :func:`ensure_built` runs Maven only when the
pom or a source is newer than the build stamp, so a warm start costs one
``stat`` per source file. The build also lists what Maven resolved
(``target/dependencies.txt``); it must equal the committed
``search_node/dependencies.lock``, so a changed transitive version cannot slip
in unnoticed (``python -m devhost.services.search_node lock`` rewrites it on
purpose).

The node announces itself with one JSON line on stdout (``{"url": ...}``),
logs to ``<home>/logs/``, exits with the process that started it
(``--parent-pid``), and on SIGTERM closes the node, which flushes every shard
and releases the data-path lock: :meth:`SearchNode.stop` waits for that, so
the next start reads every document back.

``python -m devhost.services.search_node build [--if-tools]`` is what the
Makefile runs; ``run`` starts a node in the foreground for manual use.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devhost.services.process import ROOT, ServiceError, child_options, log_tail, port_open, stop_process

NODE_DIR = ROOT / "search_node"
LOCK_FILE = NODE_DIR / "dependencies.lock"
MAIN_CLASS = "mailsync.searchnode.SearchNode"
MIN_JAVA = 17
# A bounded heap: OpenSearch otherwise sizes it from the machine's memory.
# 1 GiB holds a few hundred thousand messages' segments metadata comfortably.
DEFAULT_HEAP = "1g"
# How the JVM exits after SIGTERM once its shutdown hooks (the node's close) have run: 128 + 15.
SIGTERM_EXIT = 143
# Closing flushes every shard; a large translog can take a while, a SIGKILL would lose it.
STOP_GRACE_S = 60.0
# JVM flags: a fixed heap avoids resizing pauses; -XX:+ExitOnOutOfMemoryError makes an
# out-of-memory node die loudly instead of limping; no perf-data file in /tmp.
#
# -XX:TieredStopAtLevel=1 compiles the node's hot code with C1 only, never C2. This node is
# the embedded one (make run, the test session, benchmarks): it lives minutes to hours on a
# small machine, and C2's optimising compiler never pays for itself there. Measured on the
# IMAP bench mailbox (20,000 documents per load, a fresh node, 4 loads; bench/README.md, "IMAP
# initial sync"): with C2 the compiler threads alone took 325, 312, 184 and 163 µs of CPU per
# document on loads 1-4 and the whole node 613 → 263 µs; with C1 only, the compiler took 4-9 µs
# and the whole node 238 → 159-185 µs, from the first load on, and start-up CPU halved (7.3 →
# 3.4 s). C2's code is faster once it is all compiled (~100 µs per document against ~160 after
# 80,000), but it would take some 300,000 documents to earn back its compile time. A cluster
# we do not start (ELASTICSEARCH_URL; production) keeps its own JVM options.
JVM_FLAGS = ("-XX:+UseG1GC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError", "-XX:-UsePerfData",
             "-Dfile.encoding=UTF-8", "-Dlog4j2.disable.jmx=true", "-Dlog4j.shutdownHookEnabled=false")


class SearchNodeUnavailable(ServiceError):
    """Java 17+ or Maven is missing here, so the node can be neither built nor run (the message says which)."""


@dataclass(frozen=True)
class BuildLayout:
    """Where a search_node project's sources and build outputs live (the repository's by default)."""

    project: Path = NODE_DIR

    @property
    def target(self) -> Path:
        return self.project / "target"

    @property
    def stamp(self) -> Path:
        return self.target / ".built"

    @property
    def classpath(self) -> str:
        # Jars only (our class is in search-node.jar, not target/classes): the JVM's class-data
        # archive refuses a classpath with a non-empty directory on it.
        return f"{self.target / 'search-node.jar'}{os.pathsep}{self.target / 'lib' / '*'}"

    @property
    def class_archive(self) -> Path:
        return self.target / "search-node.jsa"

    @property
    def resolved(self) -> Path:
        return self.target / "dependencies.txt"

    @property
    def lock(self) -> Path:
        return self.project / "dependencies.lock"

    def sources(self) -> Iterator[Path]:
        yield self.project / "pom.xml"
        yield self.lock
        yield from (p for p in (self.project / "src").rglob("*") if p.is_file())


def java_binary() -> str:
    """The ``java`` to use (JAVA_HOME's, as Maven does, else PATH's), checked to be Java 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise SearchNodeUnavailable(f"Java {MIN_JAVA}+ is not installed (no `java` on PATH or in JAVA_HOME)")
    major = java_major(java)
    if major < MIN_JAVA:
        raise SearchNodeUnavailable(f"Java {MIN_JAVA}+ is needed, {java} is Java {major}")
    return java


def java_major(java: str) -> int:
    """The feature version of ``java`` (8 for 1.8.0_x, 17 for 17.0.15)."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SearchNodeUnavailable(f"cannot run {java}: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        raise SearchNodeUnavailable(f"cannot read the version of {java}: {out.strip()[:200]}")
    first, second = int(match.group(1)), int(match.group(2) or 0)
    return second if first == 1 else first


def maven_binary() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise SearchNodeUnavailable("Maven is not installed (no `mvn` on PATH); it builds the search node")
    return mvn


def needs_build(layout: BuildLayout = BuildLayout()) -> bool:
    """True when the stamp is missing or older than the pom, the lock or a source file."""
    try:
        built = layout.stamp.stat().st_mtime
    except FileNotFoundError:
        return True
    return any(path.stat().st_mtime > built for path in layout.sources() if path.exists())


def resolved_dependencies(path: Path) -> list[str]:
    """``group:artifact:type:version:scope`` lines of a ``mvn dependency:list`` output file, sorted."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" -- ", 1)[0].strip()  # newer plugins append " -- module name"
        if line.count(":") >= 4 and not line.startswith("#"):
            lines.append(line)
    return sorted(lines)


def check_lock(layout: BuildLayout = BuildLayout()) -> None:
    """Fail when what Maven resolved differs from the committed lock (names what was added and removed)."""
    resolved = resolved_dependencies(layout.resolved)
    if not layout.lock.exists():
        raise ServiceError(f"{layout.lock} is missing: run `python -m devhost.services.search_node lock`")
    locked = resolved_dependencies(layout.lock)
    if resolved != locked:
        added = sorted(set(resolved) - set(locked))
        removed = sorted(set(locked) - set(resolved))
        raise ServiceError(f"Maven resolved other dependencies than {layout.lock.name}: added {added}, removed "
                           f"{removed}; if the pom changed on purpose, run "
                           "`python -m devhost.services.search_node lock` and commit the lock")


@contextlib.contextmanager
def _build_lock(layout: BuildLayout) -> Iterator[None]:
    """One build at a time (two test workers may ask at once); the second then finds it built."""
    layout.target.mkdir(parents=True, exist_ok=True)
    with (layout.target / ".build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(layout: BuildLayout = BuildLayout(), *, check: bool = True) -> None:
    """Run ``mvn package`` (offline-friendly, quiet) and stamp the result; Maven's output only on failure."""
    java_binary()
    mvn = maven_binary()
    args = [mvn, "-q", "-B", "-ntp", "-Dstyle.color=never", "-f", str(layout.project / "pom.xml"),
            "package", "-DskipTests"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=layout.project, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise ServiceError(f"building the search node failed ({' '.join(args[1:])}):\n" + "\n".join(output[-40:]))
    if check:
        check_lock(layout)
    make_class_archive(layout)
    layout.stamp.touch()


def make_class_archive(layout: BuildLayout = BuildLayout()) -> None:
    """Start a node once and keep the classes it loaded in a class-data archive (AppCDS) for every later start.

    Loading and verifying OpenSearch's classes is most of a node's start;
    mapping them from the archive instead measured 20-22 s against 36-45 s
    to the URL line on this (heavily shared) machine. The JVM writes the
    archive when the node exits, which takes a while, so it is done here,
    once per build, and never on a person's Ctrl-C. Without the archive
    (this failed, another JDK) the node starts the slow way; the JVM checks
    that an archive matches and ignores one that does not.
    """
    java = java_binary()
    layout.class_archive.unlink(missing_ok=True)
    partial = layout.class_archive.with_suffix(".jsa.partial")
    partial.unlink(missing_ok=True)
    home = layout.target / "archive-home"
    shutil.rmtree(home, ignore_errors=True)
    try:
        process = _launch(java, layout, home, data=home / "data", host="127.0.0.1", port=0, heap=DEFAULT_HEAP,
                          log_path=home / "logs" / "search-node.out", own_session=False,
                          extra=(f"-XX:ArchiveClassesAtExit={partial}",))
        try:
            _wait_for_url(process, 300.0, home / "logs" / "search-node.out")
        finally:
            stop_process(process, grace_s=300.0)
        if process.returncode != SIGTERM_EXIT or not partial.exists():
            raise ServiceError(f"the node exited with {process.returncode} and no archive\n"
                               f"{log_tail(home / 'logs' / 'search-node.out')}")
        partial.replace(layout.class_archive)
    except ServiceError as exc:
        print(f"search node: no class-data archive, so every start is slower: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def ensure_built(layout: BuildLayout = BuildLayout()) -> bool:
    """Build when needed; True if Maven ran. Raises SearchNodeUnavailable without Java 17+ (or Maven, to build)."""
    if not needs_build(layout):
        return False
    with _build_lock(layout):
        if not needs_build(layout):
            return False
        build(layout)
        return True


@dataclass
class SearchNode:
    """A running embedded OpenSearch node."""

    url: str
    process: subprocess.Popen[bytes]
    home: Path
    data: Path
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM and wait: the node closes (flushes every shard) before exiting."""
        stop_process(self.process, grace_s=grace_s)


def _wait_for_url(process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> str:
    """Read stdout until the node's ``{"url": ...}`` line; keep draining it into the log afterwards."""
    found: dict[str, str] = {}
    announced = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        with log_path.open("ab") as log:
            for line in process.stdout:
                if not announced.is_set():
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if isinstance(message, dict) and "url" in message:
                            found["url"] = str(message["url"]).rstrip("/")
                            announced.set()
                            continue
                # Anything else the JVM prints (a crash report, a stray warning) belongs in the log.
                log.write(line)
                log.flush()
        announced.set()

    threading.Thread(target=read, name="search-node-stdout", daemon=True).start()
    if not announced.wait(timeout_s) or "url" not in found:
        code = process.poll()
        stop_process(process, grace_s=5)
        what = f"exited with code {code}" if code is not None else f"did not start within {timeout_s:g} s"
        raise ServiceError(f"the search node {what}\n{log_tail(log_path)}")
    return found["url"]


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    """Wait for ``yellow``: every primary shard is started, so whatever was on disk is searchable again."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceError(f"the search node at {url} did not reach yellow within {timeout_s:g} s\n"
                               f"{log_tail(log_path)}")
        wait_s = max(1, int(min(remaining, 30)))
        try:
            with urllib.request.urlopen(f"{url}/_cluster/health?wait_for_status=yellow&timeout={wait_s}s",
                                        timeout=wait_s + 5) as response:
                if json.load(response).get("status") in ("yellow", "green"):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            # 408 (timed out waiting) and connection resets while starting: ask again.
            if process.poll() is not None:
                raise ServiceError(f"the search node exited with code {process.returncode}\n"
                                   f"{log_tail(log_path)}") from None
            time.sleep(0.2)


def start_search_node(home: Path, *, data: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                      heap: str = DEFAULT_HEAP, timeout_s: float = 120.0, log_path: Path | None = None,
                      own_session: bool = False, parent_pid: int | None = None,
                      layout: BuildLayout = BuildLayout(), jvm_flags: Sequence[str] = ()) -> SearchNode:
    """Build if needed, start the node (``home`` for its folders, ``data`` for the indices; port 0 = free).

    Returns once the node answers ``yellow``, so documents written before the
    last clean stop are readable. The node exits with this process, or with
    ``parent_pid`` when given (then in a session of its own, not tied to this
    process at all): the test session's controller passes its pid so that
    every xdist worker can share the node one of them started.
    """
    java = java_binary()
    ensure_built(layout)
    if port and port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use (another search node or Elasticsearch?)")
    data = data or home / "data"
    log_path = log_path or home / "logs" / "search-node.out"
    archive = layout.class_archive
    extra: tuple[str, ...] = (f"-XX:SharedArchiveFile={archive}", "-Xshare:auto") if archive.exists() else ()
    extra += tuple(jvm_flags)   # after JVM_FLAGS: a later -XX flag wins (bench/node_loads.py compares some)
    process = _launch(java, layout, home, data=data, host=host, port=port, heap=heap, log_path=log_path,
                      own_session=own_session, extra=extra, parent_pid=parent_pid)
    started = time.monotonic()
    try:
        url = _wait_for_url(process, timeout_s, log_path)
        wait_until_healthy(url, process, timeout_s - (time.monotonic() - started), log_path)
    except BaseException:
        stop_process(process, grace_s=10)
        raise
    return SearchNode(url=url, process=process, home=home, data=data, log_path=log_path)


def _launch(java: str, layout: BuildLayout, home: Path, *, data: Path, host: str, port: int, heap: str,
            log_path: Path, own_session: bool, extra: tuple[str, ...],
            parent_pid: int | None = None) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [java, f"-Xms{heap}", f"-Xmx{heap}", *JVM_FLAGS, *extra, f"-Djava.io.tmpdir={_tmpdir(home)}",
            "-cp", layout.classpath, MAIN_CLASS, "--home", str(home), "--data", str(data),
            "--host", host, "--port", str(port), "--parent-pid", str(parent_pid or os.getpid())]
    # Tied to another process (parent_pid): not to this one's death signal, and not to its Ctrl-C.
    options = {"start_new_session": True} if parent_pid else child_options(own_session=own_session)
    with log_path.open("ab") as log:
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=home, **options)
    return process


def _tmpdir(home: Path) -> Path:
    # The JVM and JNA unpack native files here; a private folder keeps two nodes apart.
    path = home / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_lock(layout: BuildLayout = BuildLayout()) -> None:
    """Build without the check and record what Maven resolved as the new lock."""
    with _build_lock(layout):
        build(layout, check=False)
        header = ("# What Maven resolved for search_node/pom.xml (mvn dependency:list, sorted).\n"
                  "# Checked after every build; rewrite with `python -m devhost.services.search_node lock`.\n")
        layout.lock.write_text(header + "".join(f"{line}\n" for line in resolved_dependencies(layout.resolved)),
                               encoding="utf-8")
        layout.stamp.touch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devhost.services.search_node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build when the sources are newer than the stamp")
    build_cmd.add_argument("--if-tools", action="store_true",
                           help="without Java 17+ or Maven, succeed quietly (make run then says so and uses osmem)")
    commands.add_parser("lock", help="build and rewrite dependencies.lock from what Maven resolved")
    run_cmd = commands.add_parser("run", help="start a node in the foreground until Ctrl-C")
    run_cmd.add_argument("--home", type=Path, default=ROOT / ".local" / "search-node")
    run_cmd.add_argument("--port", type=int, default=9200)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            if ensure_built():
                print(f"search node built ({NODE_DIR / 'target'})")
        elif args.command == "lock":
            write_lock()
            print(f"wrote {LOCK_FILE}")
        else:
            node = start_search_node(args.home, port=args.port)
            print(f"search node {node.url} (data in {node.data}, log {node.log_path}); Ctrl-C stops it", flush=True)
            try:
                node.process.wait()
            except KeyboardInterrupt:
                node.stop()
    except SearchNodeUnavailable as exc:
        if getattr(args, "if_tools", False):
            return 0    # make run: the stack says it in its one line when it falls back to osmem
        print(f"search node: {exc}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"search node: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
