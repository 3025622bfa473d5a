"""Queue triggers under the devhost against Azurite: success, retry, poison, leases, shutdown, outputs."""

from __future__ import annotations

import base64
import json
import time

import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from devhost.config import QueueOptions
from devhost.queues import QueueClient as HostQueueClient
from tests.devhost.conftest import HostFactory, eventually
from tests.devhost.sample_app import Recorder

WORKER = frozenset({"worker"})


def send(client: QueueClient, job: dict[str, object]) -> None:
    """Enqueue as a producer for the Functions host does: base64 (host.json messageEncoding default)."""
    client.send_message(base64.b64encode(json.dumps(job).encode()).decode())


def queue_length(client: QueueClient) -> int:
    try:
        return client.get_queue_properties().approximate_message_count or 0
    except ResourceNotFoundError:
        return 0


def test_success_deletes_the_message(host_sample: HostFactory, work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings)
    send(client, {"id": "a"})
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    call = host.recorder.of("worker")[0]
    assert call.data["job"] == {"id": "a"}
    assert call.data["dequeue_count"] == 1
    assert call.data["message_id"] and call.data["pop_receipt"] and call.data["inserted"] is not None
    host.stop()
    assert queue_length(client) == 0


def test_failure_makes_the_message_visible_again_after_visibility_timeout(  # type: ignore[no-untyped-def]
        host_sample: HostFactory, work_queue) -> None:
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings,
                       queues=QueueOptions(max_dequeue_count=5, visibility_timeout_s=2, max_polling_interval_s=0.2))
    send(client, {"id": "b", "mode": "fail_until:2"})
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    first, second = host.recorder.of("worker")
    assert (first.data["dequeue_count"], second.data["dequeue_count"]) == (1, 2)
    assert first.data["message_id"] == second.data["message_id"]
    # Correctness, not speed: the retry must not come before the 2 s retry delay (Azurite
    # keeps visibility times to the second, hence the margin).
    assert second.at - first.at >= 1.0
    host.stop()
    assert queue_length(client) == 0


def test_message_invisible_while_waiting_for_retry(host_sample: HostFactory, work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings,
                       queues=QueueOptions(max_dequeue_count=5, visibility_timeout_s=60, max_polling_interval_s=0.2))
    send(client, {"id": "c", "mode": "fail"})
    host.recorder.wait_for(lambda r: len(r.of("worker")) == 1)
    host.stop()
    assert queue_length(client) == 1  # not lost
    assert list(client.peek_messages()) == []  # not visible for another minute
    assert len(host.recorder.of("worker")) == 1


def test_poison_after_max_dequeue_count(host_sample: HostFactory, work_queue, azurite) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings,
                       queues=QueueOptions(max_dequeue_count=3, visibility_timeout_s=0, max_polling_interval_s=0.2))
    send(client, {"id": "d", "mode": "fail"})
    poison = QueueClient.from_connection_string(azurite.connection_string, f"{settings['WORK_QUEUE']}-poison")
    host.recorder.wait_for(lambda r: len(r.of("worker")) == 3)
    eventually(lambda: queue_length(poison) == 1)
    host.stop()
    assert [c.data["dequeue_count"] for c in host.recorder.of("worker")] == [1, 2, 3]
    assert queue_length(client) == 0
    [message] = poison.receive_messages()
    assert json.loads(base64.b64decode(message.content)) == {"id": "d", "mode": "fail"}


def test_undecodable_message_goes_to_poison_unprocessed(host_sample: HostFactory, work_queue, azurite) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings)
    client.send_message("this is not base64 !!")
    send(client, {"id": "after"})
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    poison = QueueClient.from_connection_string(azurite.connection_string, f"{settings['WORK_QUEUE']}-poison")
    host.stop()
    assert [c.data["job"] for c in host.recorder.of("worker")] == [{"id": "after"}]
    assert [m.content for m in poison.peek_messages()] == ["this is not base64 !!"]


def test_concurrency_is_bounded_by_batch_size(host_sample: HostFactory, work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    for i in range(6):
        send(client, {"id": i, "mode": "slow", "seconds": 0.4})
    host = host_sample(functions=WORKER, settings=settings,
                       queues=QueueOptions(batch_size=2, max_polling_interval_s=0.2))
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 6)
    host.stop()
    events = sorted([(c.at, +1) for c in host.recorder.of("worker")]
                    + [(c.at, -1) for c in host.recorder.of("worker_done")])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2
    assert sorted(c.data["job"]["id"] for c in host.recorder.of("worker_done")) == list(range(6))


def test_lease_is_renewed_while_the_function_runs(host_sample: HostFactory, work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings, queue_lease_s=2)
    send(client, {"id": "long", "mode": "slow", "seconds": 3.5})
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    host.stop()
    assert len(host.recorder.of("worker")) == 1  # never handed to a second invocation
    assert queue_length(client) == 0


def test_graceful_shutdown_returns_in_flight_messages(host_sample: HostFactory, work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, client = work_queue
    recorder = Recorder()
    host = host_sample(functions=WORKER, settings=settings, recorder=recorder)
    send(client, {"id": "inflight", "mode": "block"})
    recorder.wait_for(lambda r: len(r.of("worker")) == 1)
    host.stop(grace_s=0.2)  # the function is still blocked: its message must go back
    [peeked] = client.peek_messages()
    assert json.loads(base64.b64decode(peeked.content)) == {"id": "inflight", "mode": "block"}
    recorder.release.set()  # the abandoned invocation ends; its late result changes nothing
    recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    assert queue_length(client) == 1

    again = host_sample(functions=WORKER, settings=settings)
    again.recorder.release.set()
    again.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    assert again.recorder.of("worker")[0].data["dequeue_count"] == 2
    again.stop()
    assert queue_length(client) == 0


def test_shutdown_waits_for_invocations_that_finish_within_grace(  # type: ignore[no-untyped-def]
        host_sample: HostFactory, work_queue) -> None:
    settings, client = work_queue
    host = host_sample(functions=WORKER, settings=settings)
    send(client, {"id": "short", "mode": "slow", "seconds": 0.5})
    host.recorder.wait_for(lambda r: len(r.of("worker")) == 1)
    host.stop(grace_s=20)
    assert len(host.recorder.of("worker_done")) == 1
    assert queue_length(client) == 0


def test_queue_output_binding_feeds_the_trigger(host_sample: HostFactory, work_queue) -> None:  # type: ignore[no-untyped-def]
    settings, _client = work_queue
    host = host_sample(functions=WORKER | {"enqueue"}, settings=settings)
    response = requests.post(host.url("/api/enqueue"), json=[{"id": 1}, {"id": 2}], timeout=10)
    assert response.status_code == 202
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 2)
    host.stop()
    assert sorted(c.data["job"]["id"] for c in host.recorder.of("worker_done")) == [1, 2]


def test_listener_outlives_storage_outage(host_sample: HostFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Storage down at start (or restarting): the listener backs off, then picks up where it left."""
    from devhost.services.azurite import connection_string, start_azurite
    from devhost.services.process import free_port

    queue_port, table_port = free_port(), free_port()
    settings = {"AzureWebJobsStorage": connection_string("127.0.0.1", queue_port, table_port), "WORK_QUEUE": "late"}
    host = host_sample(functions=WORKER, settings=settings, queues=QueueOptions(max_polling_interval_s=0.3))
    azurite = start_azurite(tmp_path / "late-azurite", queue_port=queue_port, table_port=table_port)
    try:
        client = QueueClient.from_connection_string(azurite.connection_string, "late")
        client.create_queue()
        send(client, {"id": "after-outage"})
        host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
        host.stop()
        assert queue_length(client) == 0
    finally:
        azurite.stop()


def test_a_finished_invocation_does_not_make_the_listener_poll(host_sample, work_queue, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Azure's listener polls on its back-off (0.1 s doubling after an empty poll), not when an invocation ends:
    jobs our code enqueues go through the Storage SDK, which tells the host nothing. (The devhost used to poll
    at once after every invocation and restart its back-off: empty receives Azure does not make.)"""
    settings, client = work_queue
    receives: list[float] = []
    original = HostQueueClient.receive_messages    # the devhost's client (RestQueue off the event loop)

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        receives.append(time.monotonic())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HostQueueClient, "receive_messages", counting)
    # 6.5 s of work: the back-off after the poll that found it polls ~0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3 and
    # then 12.7 s later (each 0.8-1.0 of that, the jitter), so nothing falls just after the invocation ends.
    send(client, {"id": 1, "mode": "slow", "seconds": 6.5})
    host = host_sample(functions=WORKER, settings=settings, queues=QueueOptions(max_polling_interval_s=30))
    host.recorder.wait_for(lambda r: len(r.of("worker_done")) == 1)
    done = host.recorder.of("worker_done")[0].at
    eventually(lambda: queue_length(client) == 0)       # deleted: the listener is done with it
    time.sleep(0.5)
    host.stop()
    assert receives and receives[0] < done
    assert [at for at in receives if done < at < done + 0.5] == []
