"""The one Storage client helper: connection strings (Azurite) and identity-based settings."""

from __future__ import annotations

import pytest

from mailsync.errors import ConfigurationError
from mailsync.settings import Settings
from mailsync.storage.connection import queue_client, table_client, table_name


def test_clients_from_a_connection_string_talk_to_azurite(storage_settings: Settings) -> None:
    table = table_client(storage_settings, "conn")
    table.create_table()
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "v": 1})
    assert table.get_entity("p", "r")["v"] == 1
    queue = queue_client(storage_settings, storage_settings.sync_queue_name)
    queue.create_queue()
    queue.send_message("héllo")
    [message] = queue.receive_messages()
    assert message.content == "héllo".encode()  # base64 on the wire, bytes back


def test_table_names_carry_the_prefix_and_are_checked(storage_settings: Settings) -> None:
    assert table_name(storage_settings, "accounts") == f"{storage_settings.table_prefix}accounts"
    with pytest.raises(ConfigurationError):
        table_name(storage_settings, "bad-name")


def test_identity_settings_point_at_the_account_endpoints() -> None:
    settings = Settings.from_env({"AzureWebJobsStorage__accountName": "mailsyncprod",
                                  "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001"})
    assert queue_client(settings, "jobs").url == "https://mailsyncprod.queue.core.windows.net/jobs"
    assert table_client(settings, "accounts").url.startswith("https://mailsyncprod.table.core.windows.net")


def test_no_storage_configured_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        queue_client(Settings.from_env({}), "jobs")


def test_development_storage_shortcut() -> None:
    settings = Settings.from_env({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert queue_client(settings, "jobs").url == "http://127.0.0.1:10001/devstoreaccount1/jobs"
