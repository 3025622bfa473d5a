"""RecentAccounts: a NOTIFIED job reuses its process's read of a live account, never of a gone or stopped one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailsync.models import Account, AccountStatus
from mailsync.monitoring.recent_accounts import RecentAccounts
from tests.monitoring.harness import Harness, make_harness


@pytest.fixture
def harness(storage_env: dict[str, str]) -> Harness:
    return make_harness(storage_env)


class CountingAccounts:
    """The real accounts table, counting reads."""

    def __init__(self, harness: Harness) -> None:
        self.inner = harness.accounts
        self.reads = 0

    def get(self, account_id: str) -> Account | None:
        self.reads += 1
        return self.inner.get(account_id)  # type: ignore[no-any-return]

    def iter_accounts(self) -> object:
        return self.inner.iter_accounts()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_linked_account_read_moments_ago_is_reused_until_it_is_old(harness: Harness) -> None:
    accounts, clock = CountingAccounts(harness), Clock()
    recent = RecentAccounts(accounts, ttl_s=30, clock=clock)
    account_id = harness.add_account(AccountStatus.SYNCED)
    assert recent.get(account_id, linked=True) is not None and accounts.reads == 1
    clock.now += 29
    assert recent.get(account_id, linked=True) is not None and accounts.reads == 1
    clock.now += 2
    assert recent.get(account_id, linked=True) is not None and accounts.reads == 2


def test_without_its_sync_rows_the_account_is_read_and_a_gone_one_is_forgotten(harness: Harness) -> None:
    accounts = CountingAccounts(harness)
    recent = RecentAccounts(accounts, ttl_s=30, clock=Clock())
    account_id = harness.add_account(AccountStatus.SYNCED)
    assert recent.get(account_id, linked=True) is not None
    harness.accounts.delete(account_id)
    # Unlinked: the sync rows go before the account row, so the caller's read no longer vouches for it.
    assert recent.get(account_id, linked=False) is None and accounts.reads == 2
    assert recent.get(account_id, linked=True) is None and accounts.reads == 3, "a gone account is not remembered"


def test_an_account_that_must_sign_in_again_is_never_reused(harness: Harness) -> None:
    accounts = CountingAccounts(harness)
    recent = RecentAccounts(accounts, ttl_s=30, clock=Clock())
    account_id = harness.add_account(AccountStatus.REAUTH_REQUIRED)
    assert recent.get(account_id, linked=True) is not None
    stored = harness.accounts.get(account_id)
    harness.accounts.save(replace(stored, status=AccountStatus.SYNCED))   # linked again
    account = recent.get(account_id, linked=True)
    assert account is not None and account.status == AccountStatus.SYNCED and accounts.reads == 2


def test_the_oldest_entries_go_first_when_full(harness: Harness) -> None:
    accounts = CountingAccounts(harness)
    recent = RecentAccounts(accounts, ttl_s=30, max_entries=2, clock=Clock())
    first, second, third = (harness.add_account(AccountStatus.SYNCED) for _ in range(3))
    for account_id in (first, second, third):
        recent.get(account_id, linked=True)
    assert accounts.reads == 3
    recent.get(third, linked=True)
    recent.get(second, linked=True)
    assert accounts.reads == 3
    recent.get(first, linked=True)
    assert accounts.reads == 4
