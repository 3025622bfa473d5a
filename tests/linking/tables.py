"""Test helpers: the linking tables and cipher for a test's storage settings."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from mailsync.security.crypto import TokenCipher
from mailsync.settings import Settings
from mailsync.storage import connection
from mailsync.storage.accounts import TableAccountRepository
from mailsync.storage.auth_flows import TableAuthFlowStore
from mailsync.storage.rest.table import RestTable
from mailsync.storage.table_errors import ensure_table
from mailsync.storage.tokens import TableTokenStore

TEST_KEY = ("test1", base64.b64decode(base64.b64encode(bytes(range(32)))))


def table_client(settings: Settings, name: str) -> RestTable:
    table = connection.table_client(settings, name)
    ensure_table(table)
    return table


@dataclass
class LinkingTables:
    accounts_table: RestTable
    flows_table: RestTable
    cipher: TokenCipher
    tokens: TableTokenStore
    accounts: TableAccountRepository
    flows: TableAuthFlowStore


def linking_tables(settings: Settings, cipher: TokenCipher | None = None) -> LinkingTables:
    cipher = cipher or TokenCipher([TEST_KEY])
    accounts_table = table_client(settings, "accounts")
    flows_table = table_client(settings, "authflows")
    tokens = TableTokenStore(accounts_table, cipher)
    return LinkingTables(accounts_table, flows_table, cipher, tokens, TableAccountRepository(accounts_table, tokens),
                         TableAuthFlowStore(flows_table, cipher))
