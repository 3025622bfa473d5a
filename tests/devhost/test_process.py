"""``python -m devhost`` as a real process: serves, and on SIGTERM returns in-flight messages and exits."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from devhost.os_threads import IO_THREAD, host_thread_cpu_s, stat_cpu_s
from devhost.services.process import ServiceError
from tests.devhost.conftest import eventually
from tests.fixtures.devhost import DevhostProcess


def test_sigterm_returns_in_flight_messages_and_exits(devhost_factory: Callable[..., DevhostProcess],
                                                      work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    env = {**settings, "TICK_SCHEDULE": "0 0 0 1 1 *", "HUB": "h"}
    host = devhost_factory(env, app="tests.devhost.process_app:app", functions=["worker", "echo"],
                           extra_args=["--shutdown-grace-s", "0.5"])
    assert requests.get(f"{host.base_url}/api/echo/3", timeout=10).json()["route"] == {"id": "3"}

    client.send_message(base64.b64encode(json.dumps({"id": "held", "mode": "block"}).encode()).decode())
    # Wait until the function runs. The message being invisible is not enough: Azurite hides it
    # when it answers the devhost's receive, and under load a SIGTERM sent then lands before the
    # devhost has read that answer; the message then goes back without ever being invoked.
    eventually(lambda: "worker blocked on held" in host.logs())
    assert host.stop(timeout_s=20) == 0  # SIGTERM: graceful, and the blocked thread does not hold the exit
    [message] = client.peek_messages()  # handed back at once, not after its lease
    assert json.loads(base64.b64decode(message.content))["id"] == "held"
    assert message.dequeue_count == 1
    assert "returning in-flight message" in host.logs()


def test_bad_app_setting_fails_start_with_a_clear_message(devhost_factory: Callable[..., DevhostProcess]) -> None:
    with pytest.raises(ServiceError, match="WORK_QUEUE"):
        devhost_factory({"HUB": "h", "TICK_SCHEDULE": "* * * * * *"}, app="tests.devhost.process_app:app",
                        timeout_s=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from /proc")
def test_host_threads_are_named_so_their_cpu_is_told_from_the_functions(
        devhost_factory: Callable[..., DevhostProcess], work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    env = {**settings, "TICK_SCHEDULE": "0 0 0 1 1 *", "HUB": "h"}
    host = devhost_factory(env, app="tests.devhost.process_app:app", functions=["worker", "echo"])
    client.send_message(base64.b64encode(json.dumps({"id": "a"}).encode()).decode())
    eventually(lambda: not client.peek_messages())   # received and deleted through the loop's executor

    names = set()
    for tid in os.listdir(f"/proc/{host.pid}/task"):
        with contextlib.suppress(OSError):
            names.add(Path(f"/proc/{host.pid}/task/{tid}/comm").read_text().strip())
    assert IO_THREAD in names
    host_s, total_s = host_thread_cpu_s(host.pid), stat_cpu_s(f"/proc/{host.pid}/stat")
    assert host_s is not None and total_s is not None
    assert 0 < host_s <= total_s
