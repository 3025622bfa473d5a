"""AzureJobQueue against Azurite: what it sends is what the queue trigger decodes."""

from __future__ import annotations

import base64
import math

import pytest
from azure.storage.queue import QueueClient

from devhost.services.azurite import Azurite
from mailsync.errors import DependencyUnavailable, InputError
from mailsync.jobs import JobKind, decode_job, new_job
from mailsync.settings import Settings
from mailsync.storage.connection import queue_client
from mailsync.storage.job_queue import AzureJobQueue


def raw_client(azurite: Azurite, settings: Settings) -> QueueClient:
    return QueueClient.from_connection_string(azurite.connection_string, settings.sync_queue_name)


def test_enqueue_creates_the_queue_and_sends_base64_json(azurite: Azurite, storage_settings: Settings) -> None:
    job = new_job(JobKind.SYNC_FOLDER, "acc-1", "folder-9", reason="test", attrs={"k": "v"})
    AzureJobQueue(storage_settings).enqueue(job)
    [message] = raw_client(azurite, storage_settings).receive_messages()
    # The raw body is base64, as host.json messageEncoding (default base64) makes the trigger expect.
    assert decode_job(base64.b64decode(message.content)) == job
    assert message.expires_on.year == 9999  # never expires: a lost job would be a silently stalled sync


def test_delayed_job_stays_invisible(azurite: Azurite, storage_settings: Settings) -> None:
    queue = AzureJobQueue(storage_settings)
    queue.enqueue(new_job(JobKind.SYNC_FOLDERS, "acc-2"), delay_s=120)
    client = raw_client(azurite, storage_settings)
    assert client.get_queue_properties().approximate_message_count == 1
    assert list(client.peek_messages()) == []


def test_recreates_a_queue_deleted_behind_its_back(storage_settings: Settings) -> None:
    queue = AzureJobQueue(storage_settings)
    queue.enqueue(new_job(JobKind.SYNC_FOLDERS, "acc-3"))
    client = queue_client(storage_settings, storage_settings.sync_queue_name)
    client.delete_queue()
    queue.enqueue(new_job(JobKind.SYNC_FOLDERS, "acc-4"))
    assert [decode_job(m.content).account_id for m in client.receive_messages()] == ["acc-4"]


@pytest.mark.parametrize("delay", [-1.0, math.nan, math.inf])
def test_rejects_bad_delays(storage_settings: Settings, delay: float) -> None:
    with pytest.raises(InputError):
        AzureJobQueue(storage_settings).enqueue(new_job(JobKind.SYNC_FOLDERS, "acc"), delay_s=delay)


def test_unreachable_storage_is_dependency_unavailable(storage_settings: Settings) -> None:
    from mailsync.storage.connection import queue_client as make

    down = Settings.from_env({"AzureWebJobsStorage": _closed_port_connection_string(),
                              "SYNC_QUEUE_NAME": storage_settings.sync_queue_name})
    queue = AzureJobQueue(down, client=make(down, down.sync_queue_name, retry_total=0))
    with pytest.raises(DependencyUnavailable):
        queue.enqueue(new_job(JobKind.SYNC_FOLDERS, "acc"))


def _closed_port_connection_string() -> str:
    from devhost.services.azurite import connection_string
    from devhost.services.process import free_port

    port = free_port()  # nothing listens there
    return connection_string("127.0.0.1", port, port)
