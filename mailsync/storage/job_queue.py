"""The sync job queue on Azure Storage queues (``mailsync.ports.JobQueue``).

Jobs are the small JSON documents of ``mailsync.jobs``; the queue client
base64-encodes them, as the Functions queue trigger expects. A delayed job
(back-off without sleeping in a worker) is sent with a visibility timeout:
Storage keeps it invisible until then. Messages never expire (TTL -1): a
job is a pointer to state that stays valid, and an expired one would be a
silently dropped sync.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Protocol

from azure.core.exceptions import AzureError, ClientAuthenticationError, ResourceExistsError, ResourceNotFoundError

from mailsync.errors import ConfigurationError, DependencyUnavailable, InputError
from mailsync.jobs import encode_job
from mailsync.models import Job
from mailsync.settings import Settings
from mailsync.storage.connection import job_queue_client

MAX_DELAY_S = 7 * 24 * 3600  # Storage's limit on a message's initial invisibility
RETRY_AFTER_S = 5.0


class QueueSender(Protocol):
    """What sending takes of a queue client: ``mailsync.storage.rest.queue.RestQueue``, or the SDK's ``QueueClient``."""

    def send_message(self, content: str, *, visibility_timeout: int | None = None,
                     time_to_live: int | None = None) -> Any: ...

    def create_queue(self) -> Any: ...

    def close(self) -> Any: ...


class AzureJobQueue:
    """Sends sync jobs to SYNC_QUEUE_NAME, creating the queue on first use if it is missing."""

    def __init__(self, settings: Settings, client: QueueSender | None = None) -> None:
        self.queue_name = settings.sync_queue_name
        self._client = client or job_queue_client(settings, settings.sync_queue_name)
        self._ready = False
        self._lock = threading.Lock()

    def enqueue(self, job: Job, *, delay_s: float = 0.0) -> None:
        """Send ``job``, invisible for ``delay_s`` seconds (rounded up to whole seconds, at most 7 days)."""
        if not math.isfinite(delay_s) or delay_s < 0:
            raise InputError(f"job delay must be a non-negative number of seconds, got {delay_s!r}")
        delay = min(math.ceil(delay_s), MAX_DELAY_S)
        body = encode_job(job)
        try:
            if not self._ready:
                self._ensure_queue()
            try:
                self._client.send_message(body, visibility_timeout=delay or None, time_to_live=-1)
            except ResourceNotFoundError:
                # Deleted since we checked (a test reset, an operator): recreate once.
                self._ready = False
                self._ensure_queue()
                self._client.send_message(body, visibility_timeout=delay or None, time_to_live=-1)
        except ClientAuthenticationError as exc:
            raise ConfigurationError(f"Azure Queues refused our credentials for queue {self.queue_name}") from exc
        except AzureError as exc:
            raise DependencyUnavailable(f"cannot enqueue a job on queue {self.queue_name}: {type(exc).__name__}",
                                        retry_after_s=RETRY_AFTER_S) from exc

    def _ensure_queue(self) -> None:
        with self._lock:
            if self._ready:
                return
            with contextlib.suppress(ResourceExistsError):
                self._client.create_queue()
            self._ready = True

    def close(self) -> None:
        self._client.close()
