"""``RestQueue`` (mailsync/storage/rest/queue.py) held to the SDK's ``QueueClient`` against Azurite.

A message sent by either is received by either with the same body (base64
on the wire, as the Functions trigger decodes it), and the receive / update
/ delete cycle the devhost's trigger runs gives the SDK's answers.
"""

from __future__ import annotations

import uuid

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.queue import QueueClient

from mailsync.settings import Settings
from mailsync.storage.connection import job_queue_client, queue_client
from mailsync.storage.rest.queue import RestQueue


@pytest.fixture
def name() -> str:
    return f"q{uuid.uuid4().hex[:16]}"


@pytest.fixture
def sdk(storage_settings: Settings, name: str) -> QueueClient:
    client = queue_client(storage_settings, name)
    client.create_queue()
    return client


@pytest.fixture
def rest(storage_settings: Settings, name: str, sdk: QueueClient) -> RestQueue:
    return job_queue_client(storage_settings, name, retry_total=0)


def test_messages_cross_between_the_sdk_and_ours(rest: RestQueue, sdk: QueueClient) -> None:
    sent = rest.send_message("{\"kind\": \"é <&> \"}", time_to_live=-1)
    [theirs] = sdk.receive_messages()
    assert theirs.content == "{\"kind\": \"é <&> \"}".encode() and theirs.id == sent.id
    assert sent.expires_on is not None and sent.expires_on.year == 9999          # never expires
    sdk.delete_message(theirs)
    sdk.send_message("from the sdk")
    [ours] = rest.receive_messages(max_messages=32, visibility_timeout=30)
    assert ours.content == b"from the sdk" and ours.dequeue_count == 1 and ours.pop_receipt
    assert rest.receive_messages(max_messages=32) == []                          # hidden for 30 s
    moved = rest.update_message(ours.id, ours.pop_receipt, visibility_timeout=0)
    [again] = rest.receive_messages()
    assert again.id == ours.id and again.dequeue_count == 2 and moved.pop_receipt != ours.pop_receipt
    with pytest.raises(HttpResponseError) as stale:                              # an old pop receipt
        rest.delete_message(again.id, ours.pop_receipt)
    with pytest.raises(HttpResponseError) as theirs_stale:
        sdk.delete_message(again.id, ours.pop_receipt)
    assert (type(stale.value), stale.value.status_code) == (type(theirs_stale.value), theirs_stale.value.status_code)
    rest.delete_message(again.id, again.pop_receipt)
    assert sdk.get_queue_properties().approximate_message_count == 0


def test_a_delayed_message_stays_hidden(rest: RestQueue, sdk: QueueClient) -> None:
    rest.send_message("later", visibility_timeout=60)
    assert list(sdk.peek_messages()) == [] and sdk.get_queue_properties().approximate_message_count == 1


def test_a_missing_queue_is_not_found_and_creating_is_idempotent(storage_settings: Settings) -> None:
    rest = job_queue_client(storage_settings, f"q{uuid.uuid4().hex[:16]}", retry_total=0)
    with pytest.raises(ResourceNotFoundError):
        rest.send_message("x")
    rest.create_queue()
    rest.create_queue()           # an existing queue with the same metadata answers 204: no error
    rest.send_message("x")
    assert [m.content for m in rest.receive_messages()] == [b"x"]
