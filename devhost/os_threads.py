"""OS-level names for the devhost's own threads, so a CPU account can tell the host from the app.

Why: the devhost is two things in one process. Its event loop (HTTP
server, queue listeners, timers, the SignalR Service stand-in) and the
loop's executor (the queue listeners' Storage calls) do what, on Azure,
Functions' own host and Azure SignalR Service do; the ``devhost-fn``
threads run the app's functions. ``bench/`` reports the two apart by
reading ``/proc/<pid>/task/<tid>/comm``, but CPython (before 3.14) leaves
every thread's OS name at the process's. So the host's threads name
themselves here. The main thread keeps its name (renaming it would rename
the process in ``ps``): a reader counts the thread whose id is the
process's id as the host's too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading

#: OS names of the devhost's host threads: a background event loop, the loop's executor. ``bench/`` matches on them.
LOOP_THREAD = "devhost-loop"
IO_THREAD = "devhost-io"
HOST_THREAD_NAMES = (LOOP_THREAD, IO_THREAD)

_PR_SET_NAME = 15
_OS_NAME_MAX = 15   # Linux keeps 16 bytes with the NUL


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` at the OS level (Linux; elsewhere nothing), never the main thread."""
    if not sys.platform.startswith("linux") or threading.current_thread() is threading.main_thread():
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:_OS_NAME_MAX], 0, 0, 0)


def stat_cpu_s(stat_path: str) -> float | None:
    """User + system CPU seconds in a ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat`` file; None
    when it cannot be read (the process or thread ended)."""
    try:
        with open(stat_path, encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def host_thread_cpu_s(pid: int) -> float | None:
    """CPU seconds of a devhost's *host* threads: its main thread and those named here.

    The rest of the process's CPU (``stat_cpu_s`` of the process minus
    this) is its functions'. The host's threads live as long as the
    process, so a difference of two readings is exact; function threads
    that ended (a round's page reader) are in the process's total, which is
    why the functions' share is taken as what remains.
    """
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="ascii", errors="replace") as comm:
                name = comm.read().strip()
        except OSError:
            continue   # a thread that ended between the listing and the read
        if tid == str(pid) or name in HOST_THREAD_NAMES:
            total += stat_cpu_s(f"/proc/{pid}/task/{tid}/stat") or 0.0
    return total
