"""The one place Azure Storage clients (queues, tables) are built from Settings.

Two ways to reach Storage, as the Functions host itself supports them:

* a connection string in ``AzureWebJobsStorage`` — Azurite locally
  (``UseDevelopmentStorage=true`` works too), or an account key;
* identity-based, in Azure: ``AzureWebJobsStorage__accountName`` (and
  ``AzureWebJobsStorage__clientId`` for a user-assigned identity), with a
  token from the managed identity (``DefaultAzureCredential``, which also
  takes a developer's ``az login`` on a workstation).

Queue clients encode bodies as base64, matching host.json
``extensions.queues.messageEncoding`` (``base64``, the Functions default),
so what we enqueue is exactly what the queue trigger decodes.

The product's tables and its job queue go through ``mailsync.storage.rest``
(one signed request on a keep-alive connection: a tenth of the SDK's CPU per
call, docs/scaling.md); the SDK's service and queue clients stay for
account-level calls (health, creating queues) and for tests that look at a
queue from outside. Both take the same settings: endpoints and credentials,
timeouts, retries, the CA bundle. The REST clients connect directly: with an
HTTP proxy configured they refuse a non-loopback Storage endpoint rather
than bypass the proxy silently.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azure.core.credentials import TokenCredential
from azure.data.tables import TableClient, TableServiceClient
from azure.storage.queue import (
    BinaryBase64DecodePolicy,
    ExponentialRetry,
    QueueClient,
    QueueServiceClient,
    TextBase64EncodePolicy,
)

from mailsync.errors import ConfigurationError
from mailsync.keepalive_http import default_tls
from mailsync.settings import Settings
from mailsync.storage.rest.auth import Endpoint, StorageAccount
from mailsync.storage.rest.queue import RestQueue
from mailsync.storage.rest.retry import RetryPolicy
from mailsync.storage.rest.service import ServiceClient
from mailsync.storage.rest.table import RestTable

# Fail fast rather than hang a function: a few seconds to connect, a bounded read.
CLIENT_OPTIONS: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 30}


def _options(settings: Settings, overrides: dict[str, Any]) -> dict[str, Any]:
    # use_env_settings: the transport's read of proxies and the CA bundle from the environment on
    # every request; Settings read them once (http_clients_read_env, http_verify).
    env: dict[str, Any] = {"use_env_settings": True} if settings.http_clients_read_env else \
        {"use_env_settings": False, "connection_verify": settings.http_verify}
    return {**CLIENT_OPTIONS, **env, **overrides}


def _queue_retry() -> ExponentialRetry:
    # Retries after ~1, 3 and 5 s; the queue SDK's default waits 15, 18 and 24 s between tries,
    # which would hold a function far longer than the outage. (Tables' default backs off from 0.8 s.)
    return ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=3, random_jitter_range=1)


def _credential(settings: Settings) -> TokenCredential:
    from azure.identity import DefaultAzureCredential  # only needed in Azure: imported on that path alone

    return DefaultAzureCredential(managed_identity_client_id=settings.storage_client_id)


def _require_storage(settings: Settings) -> None:
    if not settings.storage_connection_string and not settings.storage_account_name:
        raise ConfigurationError("no storage configured: set AzureWebJobsStorage (a connection string) "
                                 "or AzureWebJobsStorage__accountName (managed identity)")


def table_service(settings: Settings, **options: Any) -> TableServiceClient:
    """A Tables service client (``options`` override the client defaults, e.g. ``retry_total=0``)."""
    _require_storage(settings)
    kwargs = _options(settings, options)
    if settings.storage_connection_string:
        return TableServiceClient.from_connection_string(settings.storage_connection_string, **kwargs)
    endpoint = f"https://{settings.storage_account_name}.table.core.windows.net"
    return TableServiceClient(endpoint, credential=_credential(settings), **kwargs)


def table_name(settings: Settings, suffix: str) -> str:
    """The full table name for one of ours: TABLE_PREFIX + suffix (``mailsync`` + ``accounts``)."""
    name = f"{settings.table_prefix}{suffix}"
    if not name.isalnum() or not name[0].isalpha() or not 3 <= len(name) <= 63:
        raise ConfigurationError(f"table name {name!r} is invalid: 3-63 letters and digits, starting with a letter")
    return name


def sdk_table_client(settings: Settings, suffix: str, **options: Any) -> TableClient:
    """The SDK's client for table TABLE_PREFIX + ``suffix`` (tests hold ``table_client`` to its answers)."""
    return table_service(settings, **options).get_table_client(table_name(settings, suffix))


def table_client(settings: Settings, suffix: str, *, retry_total: int = 10, retry_backoff_factor: float = 0.8,
                 on_request: Callable[[str, str], None] | None = None) -> RestTable:
    """The client for table TABLE_PREFIX + ``suffix``: the SDK's retry defaults unless told (few quick retries
    for functions that answer HTTP: ``retry_total=2, retry_backoff_factor=0.3``). ``on_request(method, path)``
    sees every request sent (tests count billed transactions with it)."""
    account = storage_account(settings)
    service = _service(settings, "table", account.table, account,
                       RetryPolicy.exponential(retry_total, retry_backoff_factor), on_request)
    return RestTable(service, table_name(settings, suffix))


def job_queue_client(settings: Settings, queue_name: str, *, retry_total: int = 3, initial_backoff: float = 1,
                     increment_base: float = 2, random_jitter_range: float = 1) -> RestQueue:
    """The client the app sends jobs with; retries after ~1, 3 and 5 s unless told (``_queue_retry``)."""
    account = storage_account(settings)
    retry = RetryPolicy.storage_exponential(retry_total, initial_backoff, increment_base, random_jitter_range)
    return RestQueue(_service(settings, "queue", account.queue, account, retry, None), queue_name)


def storage_account(settings: Settings) -> StorageAccount:
    """The account's endpoints and credentials, from the connection string or the identity settings."""
    _require_storage(settings)
    if settings.storage_connection_string:
        return StorageAccount.from_connection_string(settings.storage_connection_string)
    assert settings.storage_account_name is not None
    return StorageAccount.from_identity(settings.storage_account_name, _credential(settings))


def _service(settings: Settings, kind: str, endpoint: Endpoint, account: StorageAccount,
             retry: RetryPolicy, on_request: Callable[[str, str], None] | None) -> ServiceClient:
    if settings.http_proxy_configured and endpoint.origin.host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigurationError(f"an HTTP proxy is configured, and the Storage clients do not use proxies: "
                                 f"{endpoint.url} would be reached directly")
    return ServiceClient(kind, endpoint, account.auth, retry=retry,
                         connect_timeout_s=CLIENT_OPTIONS["connection_timeout"],
                         read_timeout_s=CLIENT_OPTIONS["read_timeout"], tls=_tls(settings, endpoint),
                         on_request=on_request)


def _tls(settings: Settings, endpoint: Endpoint) -> ssl.SSLContext | None:
    if endpoint.origin.scheme != "https":
        return None
    bundle = settings.http_ca_bundle
    if bundle and Path(bundle).is_dir():
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle) if bundle else default_tls()


def _queue_kwargs(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    defaults: dict[str, Any] = {"message_encode_policy": TextBase64EncodePolicy(),
                                "message_decode_policy": BinaryBase64DecodePolicy()}
    if "retry_total" not in options:
        defaults["retry_policy"] = _queue_retry()
    return _options(settings, {**defaults, **options})


def queue_service(settings: Settings, **options: Any) -> QueueServiceClient:
    """A Queues service client (account-level calls: list, create, properties)."""
    _require_storage(settings)
    kwargs = _options(settings, {} if "retry_total" in options else {"retry_policy": _queue_retry()})
    kwargs.update(options)
    if settings.storage_connection_string:
        return QueueServiceClient.from_connection_string(settings.storage_connection_string, **kwargs)
    endpoint = f"https://{settings.storage_account_name}.queue.core.windows.net"
    return QueueServiceClient(endpoint, credential=_credential(settings), **kwargs)


def queue_client(settings: Settings, queue_name: str, **options: Any) -> QueueClient:
    """A client for one queue; bodies are base64 both ways, as the Functions queue trigger expects."""
    _require_storage(settings)
    kwargs = _queue_kwargs(settings, options)
    if settings.storage_connection_string:
        return QueueClient.from_connection_string(settings.storage_connection_string, queue_name, **kwargs)
    endpoint = f"https://{settings.storage_account_name}.queue.core.windows.net"
    return QueueClient(endpoint, queue_name, credential=_credential(settings), **kwargs)
