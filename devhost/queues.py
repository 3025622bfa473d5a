"""Queue triggers and queue output bindings against Azure Storage (Azurite locally).

What the Azure host does, and so the devhost does (queue extension 5.x):

* poll the trigger queue, backing off exponentially (0.1 s doubling up to
  ``maxPollingInterval``) while it is empty; only a poll that finds messages
  resets the back-off, and a finished invocation does not make it poll
  (the WebJobs ``QueueListener``: after a batch it polls again at once, then
  waits out ``RandomizedExponentialBackoffStrategy``; only a message a
  function of the same host wrote through an output binding cuts the wait
  short, its ``SharedQueueWatcher``);
* run up to ``batchSize`` invocations at once;
* hold each message invisible while its function runs (a lease renewed
  at half its length), delete it on success;
* on failure, make it visible again after ``visibilityTimeout`` (the
  retry delay) — or, once it has been dequeued ``maxDequeueCount`` times,
  copy it to ``<queue>-poison`` and delete it;
* decode bodies per ``messageEncoding`` (base64 by default); a body that
  cannot be decoded goes straight to the poison queue with a logged reason;
* on shutdown, stop polling, let running invocations finish within a
  grace period, and return the rest to the queue (visible at once) so
  nothing is lost.

The Storage calls go through ``mailsync.storage.rest.queue.RestQueue`` (a
signed request on a keep-alive connection, run off the event loop), not the
SDK's aio client: its pipeline cost ~2 ms of CPU per receive or delete, a
change's share of which the benchmarks counted as the app's
(docs/scaling.md, "CPU per change"). The Functions host's own client is not
our CPU in Azure.

Deliberate difference, for a host on a laptop: the lease is 60 s by
default (Azure: 10 min) so a killed devhost's messages come back sooner.

(Until 2026-12-02 the listener also polled at once after every finished
invocation and restarted its back-off at 0.1 s: at 8 changes/s that kept it
polling every ~0.1-0.4 s, the empty receives a Functions host would not
make, ~0.5 of the ~3-5 queue transactions counted per mailbox change by
``bench/change_latency.py``, docs/scaling.md. Jobs our code enqueues go
through the Storage SDK, not an output binding, so Azure's host is not told
of them either: it finds them at its next poll.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as TriggerMessage

from devhost.config import QueueOptions
from devhost.index import Binding, FunctionSpec
from devhost.invoke import Invocation, Invoker
from mailsync.storage.rest.auth import StorageAccount
from mailsync.storage.rest.queue import QueueMessage as StorageMessage
from mailsync.storage.rest.queue import RestQueue
from mailsync.storage.rest.retry import RetryPolicy
from mailsync.storage.rest.service import ServiceClient

log = logging.getLogger("devhost.queues")

DEFAULT_CONNECTION = "AzureWebJobsStorage"
MIN_POLL_S = 0.1


class BindingError(Exception):
    """An output binding value or connection the host cannot use."""


def connection_string(settings: Mapping[str, str], connection: str | None) -> str:
    """The storage connection string behind a binding's ``connection`` app setting."""
    name = connection or DEFAULT_CONNECTION
    for key in (name, f"AzureWebJobs{name}"):
        value = settings.get(key)
        if value:
            return value
    if settings.get(f"{name}__accountName") or settings.get(f"{name}__queueServiceUri"):
        raise BindingError(f"connection {name!r} is identity-based; the devhost needs a connection string "
                           f"(set {name} to Azurite's)")
    raise BindingError(f"connection {name!r}: no app setting {name} holds a storage connection string")


def encode_body(body: bytes, encoding: str) -> str:
    if encoding == "base64":
        return base64.b64encode(body).decode("ascii")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BindingError("queue message is not UTF-8 text and messageEncoding is \"none\"") from exc


def decode_body(content: str, encoding: str) -> bytes:
    """The message body; ValueError when it is not valid for the encoding."""
    if encoding == "base64":
        try:
            return base64.b64decode(content.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError("message body is not valid base64 (host.json messageEncoding is base64)") from exc
    return content.encode("utf-8")


def queue_output_bodies(value: Any) -> list[bytes]:
    """Message bodies from a queue output value, accepting exactly what the Python worker accepts."""
    if isinstance(value, str):
        return [value.encode("utf-8")]
    if isinstance(value, bytes | bytearray):
        return [bytes(value)]
    if isinstance(value, func.QueueMessage):
        return [value.get_body()]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        bodies: list[bytes] = []
        for item in value:
            if isinstance(item, str):
                bodies.append(item.encode("utf-8"))
            elif isinstance(item, func.QueueMessage):
                bodies.append(item.get_body())
            else:
                raise BindingError(f"invalid data type in output queue message list: {type(item).__name__}")
        return bodies
    raise BindingError(f"a queue output takes str, bytes, QueueMessage or a list of them, "
                       f"not {type(value).__name__} (serialize it with json.dumps first)")


class QueueClient:
    """A queue's calls for the event loop: ``RestQueue``'s, each run on a worker thread (blocking sockets)."""

    def __init__(self, queue: RestQueue) -> None:
        self._queue = queue

    async def create_queue(self) -> None:
        await asyncio.to_thread(self._queue.create_queue)

    async def send_message(self, content: str) -> None:
        await asyncio.to_thread(self._queue.send_message, content)

    async def receive_messages(self, *, max_messages: int, visibility_timeout: int) -> list[StorageMessage]:
        return await asyncio.to_thread(self._queue.receive_messages, max_messages=max_messages,
                                       visibility_timeout=visibility_timeout)

    async def delete_message(self, message_id: str, pop_receipt: str) -> None:
        await asyncio.to_thread(self._queue.delete_message, message_id, pop_receipt)

    async def update_message(self, message_id: str, pop_receipt: str, *, visibility_timeout: int) -> StorageMessage:
        return await asyncio.to_thread(self._queue.update_message, message_id, pop_receipt,
                                       visibility_timeout=visibility_timeout)

    async def close(self) -> None:
        self._queue.close()


class QueueClients:
    """Queue clients per (connection, queue), shared by listeners and output bindings."""

    def __init__(self, settings: Mapping[str, str]) -> None:
        self._settings = settings
        self._clients: dict[tuple[str, str], QueueClient] = {}
        self._created: set[tuple[str, str]] = set()
        self._listeners: dict[tuple[str, str], list[QueueListener]] = {}

    def client(self, connection: str | None, queue: str) -> QueueClient:
        key = (connection or DEFAULT_CONNECTION, queue)
        client = self._clients.get(key)
        if client is None:
            # Bodies as they are: the host handles messageEncoding itself, so a body that
            # is not base64 can be poisoned with a reason instead of crashing.
            # Short retries: the listener has its own back-off, and Azure's 15 s default would stall it.
            account = StorageAccount.from_connection_string(connection_string(self._settings, connection))
            service = ServiceClient("queue", account.queue, account.auth, connect_timeout_s=5, read_timeout_s=30,
                                    retry=RetryPolicy.storage_exponential(2, 1, 2, 1))
            client = QueueClient(RestQueue(service, queue, base64_bodies=False))
            self._clients[key] = client
        return client

    async def send(self, connection: str | None, queue: str, contents: list[str]) -> None:
        """Send already-encoded messages, creating the queue if it does not exist (as the host does)."""
        client = self.client(connection, queue)
        key = (connection or DEFAULT_CONNECTION, queue)
        if key not in self._created:
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()
            self._created.add(key)
        for content in contents:
            await client.send_message(content)
        for listener in self._listeners.get(key, []):
            listener.wake()

    def register(self, listener: QueueListener) -> None:
        self._listeners.setdefault((listener.connection, listener.queue_name), []).append(listener)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


@dataclass
class _InFlight:
    message: StorageMessage
    pop_receipt: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    returned: bool = False
    task: asyncio.Task[None] | None = None


class QueueListener:
    """Runs one queue-triggered function."""

    def __init__(self, spec: FunctionSpec, clients: QueueClients, options: QueueOptions, invoker: Invoker,
                 outputs: Any, *, lease_s: float = 60.0) -> None:
        self.spec = spec
        self.queue_name: str = spec.trigger.get("queueName")
        self.connection: str = spec.trigger.get("connection") or DEFAULT_CONNECTION
        if not self.queue_name:
            raise BindingError(f"function {spec.name}: queueTrigger has no queueName")
        self._clients = clients
        self._options = options
        self._invoker = invoker
        self._outputs = outputs
        self._lease_s = max(2, math.ceil(lease_s))
        self._in_flight: dict[str, _InFlight] = {}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()          # an output binding of this host wrote to the queue (Notify)
        self._capacity = asyncio.Event()      # an invocation finished: room for more
        self._task: asyncio.Task[None] | None = None
        clients.client(self.connection, self.queue_name)  # fail at start-up on a bad connection
        clients.register(self)

    @property
    def poison_queue_name(self) -> str:
        return f"{self.queue_name}-poison"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"queue-listener:{self.spec.name}")

    def wake(self) -> None:
        """A function of this host wrote to the queue: cut the back-off short (Azure's ``Notify``)."""
        self._wake.set()

    async def _run(self) -> None:
        client = self._clients.client(self.connection, self.queue_name)
        delay = MIN_POLL_S
        failing = False
        found_since_pause = False
        while not self._stopping.is_set():
            free = self._options.batch_size - len(self._in_flight)
            if free <= 0:
                self._capacity.clear()  # a finishing invocation sets it again
                if len(self._in_flight) >= self._options.batch_size:
                    await self._pause(None, self._capacity)
                continue
            # Cleared before the receive (Azure: a new wait source per poll), so a Notify during it counts.
            self._wake.clear()
            try:
                messages = await client.receive_messages(max_messages=free, visibility_timeout=self._lease_s)
                if failing:
                    log.info("queue %s reachable again", self.queue_name)
                failing = False
            except ResourceNotFoundError:
                messages = []  # the queue does not exist yet: nothing to do (Azure's listener waits too)
            except Exception as exc:  # AzureError, or anything else: the listener must outlive it
                if not failing:
                    log.warning("cannot poll queue %s: %s", self.queue_name, type(exc).__name__,
                                exc_info=not isinstance(exc, AzureError), extra={"function": self.spec.name})
                failing = True
                messages = []
                delay = self._options.max_polling_interval_s
            if self._stopping.is_set():
                # Received after shutdown began: hand them straight back.
                for message in messages:
                    log.info("returning message %s, received as shutdown began, to queue %s", message.id,
                             self.queue_name)
                    await self._return(client, message.id, message.pop_receipt or "")
                break
            for message in messages:
                entry = _InFlight(message=message, pop_receipt=message.pop_receipt or "")
                self._in_flight[message.id] = entry
                entry.task = asyncio.create_task(self._process(client, entry))
            if messages:
                found_since_pause = True
                continue            # at once, as Azure's listener does after a batch
            # Azure's RandomizedExponentialBackoffStrategy: the minimum after a poll that found
            # messages since the last wait, else double (up to maxPollingInterval).
            delay = MIN_POLL_S if found_since_pause else min(max(delay * 2, MIN_POLL_S),
                                                              self._options.max_polling_interval_s)
            found_since_pause = False
            await self._pause(delay * random.uniform(0.8, 1.0), self._wake)

    async def _pause(self, seconds: float | None, until: asyncio.Event) -> None:
        """Sleep until ``seconds`` pass, ``until`` is set (a slot freed, or a Notify) or shutdown starts."""
        waits = [asyncio.create_task(self._stopping.wait()), asyncio.create_task(until.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def _process(self, client: QueueClient, entry: _InFlight) -> None:
        message = entry.message
        dequeue_count = message.dequeue_count or 1
        fields = {"queue": self.queue_name, "message_id": message.id}
        try:
            if dequeue_count > self._options.max_dequeue_count:
                # Dequeued more often than allowed without a recorded failure (a host died mid-run).
                await self._poison(client, entry, f"dequeue count {dequeue_count} is over maxDequeueCount")
                return
            try:
                body = decode_body(message.text or "", self._options.message_encoding)
            except ValueError as exc:
                await self._poison(client, entry, str(exc))
                return
            if self._stopping.is_set():
                # Received just as shutdown began: never started, so hand it back at once
                # (a failure would keep it invisible for visibilityTimeout and count a dequeue).
                async with entry.lock:
                    if not entry.returned:
                        entry.returned = True
                        log.info("returning in-flight message %s to queue %s", message.id, self.queue_name)
                        await self._return(client, message.id, entry.pop_receipt)
                return
            ok = await self._invoke(entry, body, fields)
            async with entry.lock:
                if entry.returned:
                    return  # shutdown already handed it back; the late result is dropped
                if ok:
                    await client.delete_message(message.id, entry.pop_receipt)
                    return
            if dequeue_count >= self._options.max_dequeue_count:
                await self._poison(client, entry, f"failed {dequeue_count} times (maxDequeueCount "
                                                  f"{self._options.max_dequeue_count})")
            else:
                async with entry.lock:
                    if not entry.returned:
                        await client.update_message(message.id, entry.pop_receipt,
                                                    visibility_timeout=math.ceil(self._options.visibility_timeout_s))
        except AzureError as exc:
            # The lease lapses and the message comes back by itself: nothing is lost.
            log.warning("queue %s: could not complete message %s: %s", self.queue_name, message.id,
                        type(exc).__name__, extra={"function": self.spec.name})
        except Exception:
            log.exception("queue %s: host error on message %s (it returns when its lease lapses)",
                          self.queue_name, message.id)
        finally:
            self._in_flight.pop(message.id, None)
            self._capacity.set()

    async def _invoke(self, entry: _InFlight, body: bytes, fields: Mapping[str, str]) -> bool:
        message = entry.message
        value: Any
        annotation = self.spec.annotations.get(self.spec.trigger.name)
        if annotation is str:
            value = body.decode("utf-8", errors="replace")
        elif annotation is bytes:
            value = body
        else:
            value = TriggerMessage(  # type: ignore[no-untyped-call]
                id=message.id, body=body, dequeue_count=message.dequeue_count,
                expiration_time=message.expires_on, insertion_time=message.inserted_on,
                time_next_visible=message.next_visible_on, pop_receipt=entry.pop_receipt)
        renewer = asyncio.create_task(self._renew(entry))
        try:
            invocation: Invocation = await self._invoker.invoke(
                self.spec, {self.spec.trigger.name: value}, log_fields=fields)
            await self._outputs.write(self.spec, invocation, {})
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("function %s failed on message %s (dequeue count %s)", self.spec.name, message.id,
                          message.dequeue_count, extra={"function": self.spec.name, **fields})
            return False
        finally:
            renewer.cancel()

    async def _renew(self, entry: _InFlight) -> None:
        client = self._clients.client(self.connection, self.queue_name)
        while True:
            await asyncio.sleep(self._lease_s / 2)
            async with entry.lock:
                if entry.returned:
                    return
                try:
                    updated = await client.update_message(entry.message.id, entry.pop_receipt,
                                                          visibility_timeout=self._lease_s)
                    entry.pop_receipt = updated.pop_receipt or entry.pop_receipt
                except AzureError as exc:
                    log.warning("could not renew the lease on message %s: %s", entry.message.id, type(exc).__name__)

    async def _poison(self, client: QueueClient, entry: _InFlight, reason: str) -> None:
        log.error("moving message %s to queue %s: %s", entry.message.id, self.poison_queue_name, reason,
                  extra={"function": self.spec.name, "queue": self.queue_name})
        async with entry.lock:
            if entry.returned:
                return
            await self._clients.send(self.connection, self.poison_queue_name, [entry.message.text or ""])
            await client.delete_message(entry.message.id, entry.pop_receipt)

    async def _return(self, client: QueueClient, message_id: str, pop_receipt: str) -> None:
        try:
            await client.update_message(message_id, pop_receipt, visibility_timeout=0)
        except AzureError as exc:
            log.warning("could not return message %s (its lease will lapse): %s", message_id, type(exc).__name__)

    async def stop(self, grace_s: float) -> None:
        """Stop polling; give running invocations ``grace_s`` to finish, then return their messages."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        running = [e.task for e in self._in_flight.values() if e.task is not None]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        client = self._clients.client(self.connection, self.queue_name)
        for entry in list(self._in_flight.values()):
            async with entry.lock:
                if entry.returned:
                    continue
                entry.returned = True
                log.info("returning in-flight message %s to queue %s", entry.message.id, self.queue_name)
                await self._return(client, entry.message.id, entry.pop_receipt)
        self._in_flight.clear()


def trigger_queues(specs: Iterable[FunctionSpec]) -> list[Binding]:
    return [s.trigger for s in specs if s.trigger_type == "queueTrigger"]
