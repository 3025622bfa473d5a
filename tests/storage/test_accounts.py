"""TableAccountRepository against Azurite: ETags, the identity index, atomic link commits."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mailsync.errors import Conflict, NotFound
from mailsync.models import Account, AccountStatus, Provider
from mailsync.settings import Settings
from mailsync.storage.accounts import CLAIM_GRACE, IdentityClaim
from tests.linking.tables import LinkingTables, linking_tables


@pytest.fixture
def t(storage_settings: Settings) -> LinkingTables:
    return linking_tables(storage_settings)


def new_account(**changes: object) -> Account:
    now = datetime.now(UTC).replace(microsecond=0)
    account = Account(account_id=uuid.uuid4().hex, provider=Provider.OUTLOOK, status=AccountStatus.LINKING,
                      access_token_hash="ab" * 32, created_at=now, updated_at=now,
                      return_url="http://127.0.0.1:7071/data.html")
    return replace(account, **changes)  # type: ignore[arg-type]


def test_insert_get_round_trip(t: LinkingTables) -> None:
    account = new_account(display_name="Ada Lovelace", error="readable")
    saved = t.accounts.save(account)
    assert saved.etag
    loaded = t.accounts.get(account.account_id)
    assert loaded == saved
    assert t.accounts.get(uuid.uuid4().hex) is None
    assert t.accounts.get("../etc") is None  # never a key we would make


def test_insert_twice_is_a_conflict(t: LinkingTables) -> None:
    account = new_account()
    t.accounts.save(account)
    with pytest.raises(Conflict):
        t.accounts.save(account)


def test_replace_needs_the_current_etag(t: LinkingTables) -> None:
    saved = t.accounts.save(new_account())
    first = t.accounts.save(replace(saved, status=AccountStatus.SYNCING))
    with pytest.raises(Conflict):
        t.accounts.save(replace(saved, status=AccountStatus.ERROR))  # stale etag
    assert t.accounts.get(saved.account_id).status == AccountStatus.SYNCING  # type: ignore[union-attr]
    t.accounts.delete(saved.account_id)
    with pytest.raises(NotFound):
        t.accounts.save(replace(first, status=AccountStatus.SYNCED))


def test_save_with_credential_is_atomic(t: LinkingTables) -> None:
    saved = t.accounts.save(new_account())
    linked = t.accounts.save_with_credential(replace(saved, status=AccountStatus.SYNCING, address="a@x.test"),
                                             '{"cache": 1}')
    assert linked.etag != saved.etag
    stored = t.tokens.read(saved.account_id)
    assert stored is not None and stored.plaintext == '{"cache": 1}'
    # A stale account etag: neither row changes.
    with pytest.raises(Conflict):
        t.accounts.save_with_credential(replace(saved, status=AccountStatus.ERROR), '{"cache": 2}')
    assert t.tokens.read(saved.account_id).plaintext == '{"cache": 1}'  # type: ignore[union-attr]
    assert t.accounts.get(saved.account_id).status == AccountStatus.SYNCING  # type: ignore[union-attr]
    # Deleted meanwhile: NotFound, and no orphan credential appears.
    t.accounts.delete(saved.account_id)
    with pytest.raises(NotFound):
        t.accounts.save_with_credential(linked, '{"cache": 3}')
    assert t.tokens.read(saved.account_id) is None


def test_delete_removes_the_partition_and_the_claim(t: LinkingTables) -> None:
    saved = t.accounts.save(new_account())
    t.accounts.claim_address("Ada@X.test", saved.account_id)
    t.accounts.save_with_credential(replace(saved, address="ada@x.test"), "secret-cache")
    t.accounts.delete(saved.account_id)
    assert t.accounts.get(saved.account_id) is None
    assert t.tokens.read(saved.account_id) is None
    assert t.accounts.address_owner("ada@x.test") is None
    assert list(t.accounts_table.query_entities("PartitionKey eq @pk", parameters={"pk": saved.account_id})) == []
    t.accounts.delete(saved.account_id)  # idempotent


def test_address_claims_are_exclusive_and_case_insensitive(t: LinkingTables) -> None:
    one = t.accounts.save(new_account())
    two = t.accounts.save(new_account())
    t.accounts.claim_address("Ada@X.test", one.account_id)
    t.accounts.claim_address("ada@x.test ", one.account_id)  # same account again: fine
    t.accounts.save(replace(one, address="ada@x.test"))
    with pytest.raises(Conflict):
        t.accounts.claim_address("ADA@x.test", two.account_id)
    assert t.accounts.address_owner("ada@X.TEST") == one.account_id


def test_a_claim_of_a_deleted_account_is_taken_over(t: LinkingTables) -> None:
    one = t.accounts.save(new_account())
    two = t.accounts.save(new_account())
    t.accounts.claim_address("bob@x.test", one.account_id)
    t.accounts_table.delete_entity(one.account_id, "account")  # gone without releasing (a crash)
    t.accounts.claim_address("bob@x.test", two.account_id)
    assert t.accounts.address_owner("bob@x.test") == two.account_id


def test_a_claim_still_linking_is_honoured_for_the_grace_period(t: LinkingTables) -> None:
    one = t.accounts.save(new_account())
    two = t.accounts.save(new_account())
    now = datetime.now(UTC)
    t.accounts.claim_address("cy@x.test", one.account_id, now=now)
    with pytest.raises(Conflict):  # one's callback may be committing right now
        t.accounts.claim_address("cy@x.test", two.account_id, now=now + timedelta(minutes=1))
    # One never committed (it failed part-way): after the grace period the claim is stale.
    t.accounts.claim_address("cy@x.test", two.account_id, now=now + CLAIM_GRACE + timedelta(seconds=1))
    assert t.accounts.address_owner("cy@x.test") == two.account_id


def test_release_only_drops_our_own_claim(t: LinkingTables) -> None:
    one = t.accounts.save(new_account())
    two = t.accounts.save(new_account())
    t.accounts.claim_address("dee@x.test", one.account_id)
    t.accounts.release_address("dee@x.test", two.account_id)
    assert t.accounts.address_owner("dee@x.test") == one.account_id
    t.accounts.release_address("dee@x.test", one.account_id)
    assert t.accounts.address_owner("dee@x.test") is None
    t.accounts.release_address("dee@x.test", one.account_id)  # idempotent


def test_racing_claims_have_one_winner(t: LinkingTables) -> None:
    accounts = [t.accounts.save(new_account()) for _ in range(6)]
    barrier = threading.Barrier(len(accounts))
    winners: list[str] = []
    losers: list[str] = []

    def claim(account: Account) -> None:
        barrier.wait()
        try:
            t.accounts.claim_address("race@x.test", account.account_id)
            winners.append(account.account_id)
        except Conflict:
            losers.append(account.account_id)

    threads = [threading.Thread(target=claim, args=(a,)) for a in accounts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(losers) == len(accounts) - 1
    assert t.accounts.address_owner("race@x.test") == winners[0]


def test_iter_accounts_filters_by_status(t: LinkingTables) -> None:
    a = t.accounts.save(new_account(status=AccountStatus.SYNCED))
    b = t.accounts.save(new_account(status=AccountStatus.ERROR))
    t.accounts.claim_address("e@x.test", a.account_id)  # index rows are not accounts
    assert {x.account_id for x in t.accounts.iter_accounts()} == {a.account_id, b.account_id}
    assert [x.account_id for x in t.accounts.iter_accounts((AccountStatus.SYNCED,))] == [a.account_id]


def test_iter_accounts_before_the_table_exists_is_empty(storage_settings: Settings) -> None:
    # A listener or timer may start before anything was linked: no table yet means no accounts, not a crash.
    fresh = linking_tables(replace(storage_settings, table_prefix=f"n{uuid.uuid4().hex[:10]}"))
    assert list(fresh.accounts.iter_accounts()) == []


def test_iter_accounts_filters_by_provider(t: LinkingTables) -> None:
    outlook = t.accounts.save(new_account())
    imap = t.accounts.save(new_account(provider=Provider.IMAP, status=AccountStatus.SYNCED))
    assert [x.account_id for x in t.accounts.iter_accounts(providers=(Provider.IMAP,))] == [imap.account_id]
    assert [x.account_id for x in t.accounts.iter_accounts((AccountStatus.LINKING,), (Provider.OUTLOOK,))] == [
        outlook.account_id]


IMAP_LOGIN = "imap:mail.example.net:993:ada@x.test"


def test_imap_logins_and_verified_addresses_are_separate_claims(t: LinkingTables) -> None:
    imap = t.accounts.save(new_account(provider=Provider.IMAP, address="ada@x.test", provider_user_id=IMAP_LOGIN,
                                       status=AccountStatus.SYNCED))
    login = IdentityClaim.for_identity(Provider.IMAP, "ada@x.test", IMAP_LOGIN)
    assert login == IdentityClaim.mailbox(IMAP_LOGIN)
    t.accounts.claim(login, imap.account_id)
    # The same address, verified by Outlook, is free: the IMAP login never reserved it.
    outlook = t.accounts.save(new_account())
    t.accounts.claim(IdentityClaim.for_identity(Provider.OUTLOOK, "Ada@X.test", "graph-id"), outlook.account_id)
    assert t.accounts.address_owner("ada@x.test") == outlook.account_id
    # The same login twice is still one mailbox.
    other = t.accounts.save(new_account(provider=Provider.IMAP))
    with pytest.raises(Conflict):
        t.accounts.claim(login, other.account_id)
    t.accounts.delete(imap.account_id)
    assert t.accounts.owner(login) is None and t.accounts.address_owner("ada@x.test") == outlook.account_id


def test_an_address_claimed_by_an_old_imap_link_is_not_honoured_and_is_migrated(t: LinkingTables) -> None:
    # What an older version wrote: the IMAP user name claimed as an address (squatting).
    imap = t.accounts.save(new_account(provider=Provider.IMAP, address="bo@x.test", provider_user_id=IMAP_LOGIN,
                                       status=AccountStatus.SYNCED))
    t.accounts.claim_address("bo@x.test", imap.account_id)
    other = t.accounts.save(new_account(provider=Provider.IMAP, address="cy@x.test",
                                              provider_user_id=IMAP_LOGIN + "x", status=AccountStatus.SYNCED))
    t.accounts.claim_address("cy@x.test", other.account_id)
    # The real owner's Outlook link takes the address over at once, before any migration.
    outlook = t.accounts.save(new_account())
    t.accounts.claim_address("bo@x.test", outlook.account_id)
    assert t.accounts.address_owner("bo@x.test") == outlook.account_id
    # The migration gives the IMAP accounts their login claims and drops the address claims they still hold.
    assert t.accounts.migrate_imap_claims() == 2
    assert t.accounts.owner(IdentityClaim.mailbox(IMAP_LOGIN)) == imap.account_id
    assert t.accounts.owner(IdentityClaim.mailbox(IMAP_LOGIN + "x")) == other.account_id
    assert t.accounts.address_owner("cy@x.test") is None
    assert t.accounts.address_owner("bo@x.test") == outlook.account_id
    assert t.accounts.migrate_imap_claims() == 0   # idempotent
