"""The one Storage client helper: connection strings (Azurite) and identity-based settings."""

from __future__ import annotations

import pytest

from mailsync.errors import ConfigurationError
from mailsync.settings import Settings
from mailsync.storage.connection import job_queue_client, queue_client, table_client, table_name


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
    ours = job_queue_client(storage_settings, storage_settings.sync_queue_name)
    ours.send_message("wörld")
    assert [m.content for m in queue.receive_messages()] == ["wörld".encode()]   # what the trigger decodes


def test_table_names_carry_the_prefix_and_are_checked(storage_settings: Settings) -> None:
    assert table_name(storage_settings, "accounts") == f"{storage_settings.table_prefix}accounts"
    with pytest.raises(ConfigurationError):
        table_name(storage_settings, "bad-name")


def test_identity_settings_point_at_the_account_endpoints() -> None:
    settings = Settings.from_env({"AzureWebJobsStorage__accountName": "mailsyncprod",
                                  "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001"})
    assert queue_client(settings, "jobs").url == "https://mailsyncprod.queue.core.windows.net/jobs"
    assert job_queue_client(settings, "jobs").url == "https://mailsyncprod.queue.core.windows.net/jobs"
    assert table_client(settings, "accounts").url.startswith("https://mailsyncprod.table.core.windows.net")


def test_no_storage_configured_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        queue_client(Settings.from_env({}), "jobs")
    with pytest.raises(ConfigurationError):
        table_client(Settings.from_env({}), "accounts")


def test_development_storage_shortcut() -> None:
    settings = Settings.from_env({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert queue_client(settings, "jobs").url == "http://127.0.0.1:10001/devstoreaccount1/jobs"
    assert job_queue_client(settings, "jobs").url == "http://127.0.0.1:10001/devstoreaccount1/jobs"
    assert table_client(settings, "accounts").url == "http://127.0.0.1:10002/devstoreaccount1/mailsyncaccounts"


def _count_proxy_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import urllib.request

    scans: list[int] = []
    real = urllib.request.getproxies_environment

    def counting() -> dict[str, str]:
        scans.append(1)
        return real()

    monkeypatch.setattr(urllib.request, "getproxies_environment", counting)
    return scans


def test_clients_do_not_scan_the_environment_per_request_when_it_configures_no_proxy(
        storage_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests' trust_env scanned all of os.environ for proxies (twice) on every table and
    # queue call: the largest CPU item of a mailbox change (docs/scaling.md).
    scans = _count_proxy_scans(monkeypatch)
    assert not storage_settings.http_clients_read_env
    table = table_client(storage_settings, "noenv")
    table.create_table()
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "v": 1})
    queue = queue_client(storage_settings, storage_settings.sync_queue_name + "-noenv")
    queue.create_queue()
    queue.send_message("x")
    assert scans == []


def test_a_proxy_in_the_environment_keeps_the_per_request_reading(
        storage_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = Settings.from_env({"PATH": "/bin", "HTTPS_PROXY": "", "REQUESTS_CA_BUNDLE": "/etc/ca.pem"})
    assert not quiet.http_clients_read_env and quiet.http_verify == "/etc/ca.pem"   # the bundle, read once
    assert Settings.from_env({"CURL_CA_BUNDLE": "/c.pem"}).http_verify == "/c.pem"
    assert Settings.from_env({}).http_verify is True
    for name in ("HTTPS_PROXY", "http_proxy", "no_proxy", "ALL_PROXY"):
        assert Settings.from_env({name: "x"}).http_clients_read_env, name
    # With a proxy variable, the SDK's clients (a queue seen from outside, admin calls) read the
    # environment per request as before (no_proxy=* lets Azurite through), so no_proxy keeps working.
    settings = Settings.from_env({"no_proxy": "*", "AzureWebJobsStorage": storage_settings.storage_connection_string
                                  or "", "TABLE_PREFIX": storage_settings.table_prefix})
    scans = _count_proxy_scans(monkeypatch)
    queue_client(settings, storage_settings.sync_queue_name + "-withenv").create_queue()
    assert scans
    # The REST clients use no proxy: loopback (Azurite) is reached directly, a remote account is
    # refused rather than reached around the proxy.
    table_client(settings, "withenv").create_table()
    remote = Settings.from_env({"HTTPS_PROXY": "http://proxy.example:3128", "AzureWebJobsStorage":
                                "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"})
    with pytest.raises(ConfigurationError, match="proxy"):
        table_client(remote, "accounts")
    with pytest.raises(ConfigurationError, match="proxy"):
        job_queue_client(remote, "jobs")
