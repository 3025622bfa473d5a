"""The login-check pool: bounded, never queueing, holding a slot until the check really ends."""

from __future__ import annotations

import threading

import pytest

from mailsync.errors import ProviderUnavailable
from mailsync.linking.login_checks import LoginCheckPool, LoginChecksBusy


def test_results_and_errors_come_back_to_the_caller() -> None:
    pool = LoginCheckPool(2, deadline_s=5)
    assert pool.run(lambda: "ok") == "ok"

    def fails() -> None:
        raise ValueError("from the check")

    with pytest.raises(ValueError, match="from the check"):
        pool.run(fails)


def test_a_full_pool_refuses_at_once_and_a_slot_is_held_until_its_check_ends() -> None:
    pool = LoginCheckPool(1, deadline_s=0.2, retry_after_s=7)
    release = threading.Event()
    ended = threading.Event()

    def slow() -> str:
        release.wait(10)
        ended.set()
        return "late"

    with pytest.raises(ProviderUnavailable) as late:
        pool.run(slow)                      # the caller gives up after its deadline...
    assert late.value.code == "imap_timeout"
    with pytest.raises(LoginChecksBusy) as busy:
        pool.run(lambda: "next")            # ...but the check still holds its slot: no second socket
    assert busy.value.http_status == 503 and busy.value.retry_after_s == 7
    release.set()
    assert ended.wait(5)
    for _ in range(100):                    # the slot comes back when the check has returned
        try:
            assert pool.run(lambda: "next") == "next"
            break
        except LoginChecksBusy:
            threading.Event().wait(0.01)
    else:
        pytest.fail("the slot never came back")
