"""Health of the backing services: tables, queues and the search store.

Each probe is one cheap, read-only call with short timeouts and no
retries, so a down dependency answers "unavailable" in seconds instead of
hanging the health check; the probes run in parallel. Details name what
failed (an exception class, an HTTP status) and never a URL or secret.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mailsync.errors import MailsyncError
from mailsync.settings import Settings

OK, UNAVAILABLE, NOT_CONFIGURED = "ok", "unavailable", "not_configured"
_STORAGE_OPTIONS = {"retry_total": 0, "connection_timeout": 3, "read_timeout": 5}


@dataclass(frozen=True)
class DependencyHealth:
    """One dependency's state; ``required`` ones make the whole report unhealthy when not ok."""

    name: str
    status: str
    required: bool = True
    detail: str | None = None
    latency_ms: float | None = None

    @property
    def healthy(self) -> bool:
        return self.status == OK or (self.status == NOT_CONFIGURED and not self.required)


@dataclass(frozen=True)
class HealthReport:
    dependencies: list[DependencyHealth] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(d.healthy for d in self.dependencies)

    def as_dict(self) -> dict[str, object]:
        deps: dict[str, object] = {}
        for d in self.dependencies:
            entry: dict[str, object] = {"status": d.status}
            if d.detail:
                entry["detail"] = d.detail
            if d.latency_ms is not None:
                entry["latency_ms"] = round(d.latency_ms, 1)
            deps[d.name] = entry
        return {"status": OK if self.healthy else UNAVAILABLE, "dependencies": deps}


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if isinstance(status, int):
        return f"{type(exc).__name__} (HTTP {status})"
    if isinstance(exc, MailsyncError):
        return exc.code
    return type(exc).__name__


def _timed(name: str, probe: Callable[[], None], *, required: bool = True) -> DependencyHealth:
    started = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # a probe reports; it never raises
        return DependencyHealth(name, UNAVAILABLE, required, _describe(exc), (time.perf_counter() - started) * 1000)
    return DependencyHealth(name, OK, required, None, (time.perf_counter() - started) * 1000)


def _probe_tables(settings: Settings) -> None:
    from mailsync.storage.connection import table_service

    with table_service(settings, **_STORAGE_OPTIONS) as service:
        next(iter(service.list_tables(results_per_page=1).by_page()), None)


def _probe_queues(settings: Settings) -> None:
    from mailsync.storage.connection import queue_service

    with queue_service(settings, **_STORAGE_OPTIONS) as service:
        next(iter(service.list_queues(results_per_page=1).by_page()), None)


def _probe_store(settings: Settings) -> None:
    from mailsync.store.engines import connect_from_settings

    engine = connect_from_settings(settings, request_timeout_s=5)
    try:
        engine.info()
    finally:
        engine.close()


def _storage(name: str, probe: Callable[[Settings], None], settings: Settings) -> DependencyHealth:
    if not (settings.storage_connection_string or settings.storage_account_name):
        return DependencyHealth(name, NOT_CONFIGURED, True, "AzureWebJobsStorage is not set")
    return _timed(name, lambda: probe(settings))


def _store(settings: Settings) -> DependencyHealth:
    if not settings.elasticsearch_url:
        return DependencyHealth("store", NOT_CONFIGURED, False, "ELASTICSEARCH_URL is not set")
    return _timed("store", lambda: _probe_store(settings))


def check_health(settings: Settings) -> HealthReport:
    """Probe every dependency (in parallel) and report."""
    checks: list[Callable[[], DependencyHealth]] = [
        functools.partial(_storage, "tables", _probe_tables, settings),
        functools.partial(_storage, "queues", _probe_queues, settings),
        functools.partial(_store, settings),
    ]
    with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="health") as pool:
        return HealthReport(list(pool.map(lambda check: check(), checks)))
