"""Sealed credential rows against Azurite: encryption at rest, ETag concurrency, rotation."""

from __future__ import annotations

import base64
import uuid

import pytest

from mailsync.errors import ConfigurationError, Conflict, NotFound
from mailsync.security.crypto import TokenCipher
from mailsync.settings import Settings
from mailsync.storage.tokens import TableTokenStore
from tests.linking.tables import TEST_KEY, LinkingTables, linking_tables

CACHE = '{"RefreshToken": {"x": {"secret": "rt-very-secret-value"}}}'


@pytest.fixture
def t(storage_settings: Settings) -> LinkingTables:
    return linking_tables(storage_settings)


def test_rows_are_sealed_at_rest(t: LinkingTables) -> None:
    account_id = uuid.uuid4().hex
    etag = t.tokens.write(account_id, CACHE, etag=None)
    raw = t.accounts_table.get_entity(account_id, "cred-msal")
    assert raw["key_id"] == "test1"
    assert b"rt-very-secret-value" not in bytes(raw["blob"])
    assert "rt-very-secret-value" not in repr(dict(raw))
    stored = t.tokens.read(account_id)
    assert stored is not None and stored.plaintext == CACHE and stored.etag == etag
    assert "rt-very-secret-value" not in repr(stored)


def test_writes_are_etag_checked(t: LinkingTables) -> None:
    account_id = uuid.uuid4().hex
    first = t.tokens.write(account_id, "v1", etag=None)
    with pytest.raises(Conflict):
        t.tokens.write(account_id, "v1-again", etag=None)  # create when one exists
    second = t.tokens.write(account_id, "v2", etag=first)
    with pytest.raises(Conflict):
        t.tokens.write(account_id, "v2-from-a-stale-reader", etag=first)  # the lost-update case
    assert t.tokens.read(account_id).plaintext == "v2"  # type: ignore[union-attr]
    t.tokens.delete(account_id)
    with pytest.raises(NotFound):
        t.tokens.write(account_id, "v3", etag=second)
    assert t.tokens.read(account_id) is None
    t.tokens.delete(account_id)  # idempotent


def test_kinds_are_separate_rows(t: LinkingTables) -> None:
    account_id = uuid.uuid4().hex
    t.tokens.write(account_id, "msal cache", etag=None)
    t.tokens.write(account_id, "imap password", etag=None, kind="imap")
    assert t.tokens.read(account_id).plaintext == "msal cache"  # type: ignore[union-attr]
    assert t.tokens.read(account_id, "imap").plaintext == "imap password"  # type: ignore[union-attr]


def test_a_row_copied_to_another_account_does_not_open(t: LinkingTables) -> None:
    victim, attacker = uuid.uuid4().hex, uuid.uuid4().hex
    t.tokens.write(victim, CACHE, etag=None)
    t.tokens.write(attacker, "mine", etag=None)
    stolen = t.accounts_table.get_entity(victim, "cred-msal")
    t.accounts_table.upsert_entity({**stolen, "PartitionKey": attacker, "RowKey": "cred-msal"})
    with pytest.raises(ConfigurationError):
        t.tokens.read(attacker)


def test_key_rotation(storage_settings: Settings, t: LinkingTables) -> None:
    account_id = uuid.uuid4().hex
    t.tokens.write(account_id, CACHE, etag=None)  # sealed under test1
    new_key = ("test2", base64.b64decode(base64.b64encode(bytes(range(100, 132)))))
    rotated = TableTokenStore(t.accounts_table, TokenCipher([new_key, TEST_KEY]))
    stored = rotated.read(account_id)
    assert stored is not None and stored.key_id == "test1" and stored.plaintext == CACHE
    rotated.write(account_id, stored.plaintext, etag=stored.etag)  # the next refresh reseals it
    assert t.accounts_table.get_entity(account_id, "cred-msal")["key_id"] == "test2"
    only_new = TableTokenStore(t.accounts_table, TokenCipher([new_key]))
    assert only_new.read(account_id).plaintext == CACHE  # type: ignore[union-attr]
