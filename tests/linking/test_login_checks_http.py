"""Login checks over HTTP: bounded, off the request threads, and refused by the address policy.

One devhost with the linking functions and few request threads (so that,
without the bounded pool, twenty slow link attempts would hold them all),
a loopback Dovecot for a real account, and a silent server that accepts
connections and never speaks.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from devhost.services.process import free_port
from mailsync.jobs import decode_job
from tests.fixtures.devhost import DevhostProcess, app_settings, start_devhost
from tests.fixtures.dovecot import ImapUser

KEY_ENTRY = f"chk1:{base64.b64encode(bytes(range(40, 72))).decode()}"
SLOTS = 4
CHECK_TIMEOUT_S = 6


@dataclass
class Host:
    process: DevhostProcess

    @property
    def api(self) -> str:
        return f"{self.process.base_url}/api"


def start(azurite: Any, search_store_url: str, tmp: pytest.TempPathFactory, **extra: str) -> Host:
    port = free_port()
    env = app_settings(name="checks", storage=azurite.connection_string, search_store_url=search_store_url,
                       port=port, local_dir=tmp.mktemp("local"), key_entry=KEY_ENTRY, IMAP_ALLOW_INSECURE="1",
                       IMAP_VERIFY_CONCURRENCY=str(SLOTS),
                       # Bounds the connect and the greeting, which the silent server never sends.
                       IMAP_VERIFY_TIMEOUT_S=str(CHECK_TIMEOUT_S),
                       # Few shared request threads: the starvation the bounded pool prevents shows at once.
                       PYTHON_THREADPOOL_THREAD_COUNT="4", **extra)
    return Host(start_devhost(env, port=port, functions=["oauth_start", "account_get"], log_dir=tmp.mktemp("dh")))


@pytest.fixture(scope="module")
def host(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    handle = start(azurite, search_store_url, tmp_path_factory)
    try:
        yield handle
    finally:
        handle.process.stop(timeout_s=15)


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """Accepts every connection and never says a word; the list holds what it accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], held
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def imap_body(user: ImapUser, **changes: Any) -> dict[str, Any]:
    return {"provider": "imap", "host": user.host, "port": user.port, "security": "none",
            "username": user.username, "password": user.password, **changes}


def test_twenty_link_attempts_to_a_silent_host_do_not_slow_other_requests(
        host: Host, imap_user: ImapUser, silent_server: tuple[int, list[socket.socket]]) -> None:
    linked = requests.post(f"{host.api}/accounts", json=imap_body(imap_user), timeout=60)
    assert linked.status_code == 201, linked.text
    account_id, token = linked.json()["account_id"], linked.json()["access_token"]
    port, accepted = silent_server

    answers: list[tuple[float, requests.Response]] = []
    lock = threading.Lock()

    def attempt() -> None:
        answer = requests.post(f"{host.api}/accounts", json=imap_body(imap_user, port=port), timeout=120)
        with lock:
            answers.append((time.monotonic(), answer))

    attempts = [threading.Thread(target=attempt) for _ in range(20)]
    for thread in attempts:
        thread.start()
    deadline = time.monotonic() + 30
    while len(accepted) < SLOTS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(accepted) >= SLOTS, "the login checks reached the silent server"

    asked = time.monotonic()
    view = requests.get(f"{host.api}/accounts/{account_id}", headers={"Authorization": f"Bearer {token}"},
                        timeout=120)
    answered = time.monotonic()
    for thread in attempts:
        thread.join()

    assert view.status_code == 200 and view.json()["account_id"] == account_id
    checked = [(at, a) for at, a in answers if a.status_code == 400]
    busy = [a for _, a in answers if a.status_code == 503]
    assert len(checked) + len(busy) == 20, [a.status_code for _, a in answers]
    # The pool is bounded: at most SLOTS checks at a time, the rest told to come back (not queued).
    assert SLOTS <= len(checked) < 20 and busy
    assert len(accepted) <= len(checked), "no connection beyond the admitted checks"
    for answer in busy:
        assert int(answer.headers["Retry-After"]) >= 1 and answer.json()["error"]["code"] == "login_checks_busy"
    for _, answer in checked:
        assert answer.json()["error"]["code"] == "imap_unreachable"
        assert "did not answer in time" in answer.json()["error"]["message"]
    # The order that matters: the GET was answered while every admitted check still waited on the silent
    # server (each waits CHECK_TIMEOUT_S). On the shared request threads it came after them (18 s, once).
    first_check_done = min(at for at, _ in checked)
    assert answered < first_check_done
    print(f"\nGET /api/accounts/{{id}} during 20 silent link attempts: {answered - asked:.3f} s; "
          f"first check answered {first_check_done - asked:.1f} s after the GET was sent")


def test_the_policy_is_strict_unless_configured(azurite: Any, search_store_url: str,
                                                tmp_path_factory: pytest.TempPathFactory, imap_user: ImapUser,
                                                silent_server: tuple[int, list[socket.socket]]) -> None:
    """What `make run` does by default: no IMAP_ALLOWED_HOSTS, so loopback is refused before any connection."""
    strict = start(azurite, search_store_url, tmp_path_factory, IMAP_ALLOWED_HOSTS="")
    try:
        port, accepted = silent_server
        for spelling in ("127.0.0.1", "127.1", "2130706433", "0x7f.1", "localhost", "[::1]", "0.0.0.0"):
            answer = requests.post(f"{strict.api}/accounts", json=imap_body(imap_user, host=spelling, port=port),
                                   timeout=60)
            assert answer.status_code == 400, (spelling, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "address_not_allowed" and "outbound address policy" in error["message"]
        assert accepted == [], "refused before any connection"
        # A body without a JSON content type is refused before anything else (no CORS preflight for those).
        plain = requests.post(f"{strict.api}/accounts", data=b'{"provider": "outlook"}', timeout=60,
                              headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
    finally:
        strict.process.stop(timeout_s=15)


def test_a_linked_account_wakes_the_hosts_queue_listener(host: Host, imap_user: ImapUser) -> None:
    # The initial sync job goes with the SDK; a WAKE follows through the function's queue output binding,
    # which makes the host poll its queue at once instead of after up to maxPollingInterval (2.5 s) of
    # idle back-off (mailsync.jobs.WakingJobQueue). No sync worker runs here: both stay on the queue.
    linked = requests.post(f"{host.api}/accounts", json=imap_body(imap_user), timeout=60)
    assert linked.status_code == 201, linked.text
    account_id = linked.json()["account_id"]
    env = host.process.env
    queue = QueueClient.from_connection_string(env["AzureWebJobsStorage"], env["SYNC_QUEUE_NAME"],
                                               message_decode_policy=TextBase64DecodePolicy())
    jobs = [decode_job(m.content) for m in queue.peek_messages(max_messages=32)]
    assert [job.kind for job in jobs if job.account_id == account_id] == ["sync_folders", "wake"]
