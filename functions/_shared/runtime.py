"""The composition root: builds the core services from Settings, once per process.

Blueprints call ``runtime()`` and take what they need. Adapters are created
lazily (first use) so an HTTP function that never touches the store does
not connect to it, and clients with connection pools are shared across
invocations of the same worker process. This, and the Settings it holds,
is the only process-wide state.
"""

from __future__ import annotations

import functools
from functools import cached_property
from typing import TYPE_CHECKING

from mailsync.logs import configure_logging
from mailsync.settings import Settings

if TYPE_CHECKING:
    from mailsync.storage.job_queue import AzureJobQueue
    from mailsync.store.elasticsearch import ElasticsearchStore


class Runtime:
    """Lazily built adapters and services. Add one cached property per service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def job_queue(self) -> AzureJobQueue:
        """The sync job queue (SYNC_QUEUE_NAME), created on first enqueue if missing."""
        from mailsync.storage.job_queue import AzureJobQueue

        return AzureJobQueue(self.settings)

    @cached_property
    def store(self) -> ElasticsearchStore:
        """The search store at ELASTICSEARCH_URL; missing indices are created on first use.

        If the store is down this raises StoreUnavailable and is not cached, so the next call retries.
        """
        from mailsync.store.elasticsearch import ElasticsearchStore

        store = ElasticsearchStore.from_settings(self.settings)
        store.ensure_ready()
        return store


@functools.cache
def runtime() -> Runtime:
    """The process's Runtime (settings read once from the environment)."""
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    return Runtime(settings)
