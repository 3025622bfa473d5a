"""Fixtures for the devhost's own tests: the sample app hosted in process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from devhost.config import HostConfig, QueueOptions
from devhost.host import DevhostOptions, DevhostThread
from tests.devhost.sample_app import HTTP_FUNCTIONS, SETTINGS, Recorder, make_app
from tests.fixtures.azurite import unique_name
from tests.fixtures.devhost import start_devhost_in_process


@dataclass
class Hosted:
    handle: DevhostThread
    recorder: Recorder
    settings: dict[str, str]

    @property
    def base_url(self) -> str:
        return self.handle.base_url

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def stop(self, grace_s: float | None = None) -> None:
        self.handle.stop(grace_s)


HostFactory = Callable[..., Hosted]


def eventually(check: Callable[[], object], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``check`` until it returns something truthy (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def host_sample() -> Iterator[HostFactory]:
    """``host_sample(functions=..., settings=..., queues=QueueOptions(...), **options)`` -> Hosted."""
    started: list[Hosted] = []

    def factory(functions: frozenset[str] = HTTP_FUNCTIONS, settings: Mapping[str, str] | None = None,
                queues: QueueOptions | None = None, route_prefix: str = "api", recorder: Recorder | None = None,
                static_dir: Path | None = None, port: int = 0, **options: object) -> Hosted:
        recorder = recorder or Recorder()
        all_settings = {**SETTINGS, **(settings or {})}
        config = HostConfig(route_prefix=route_prefix, function_timeout_s=60,
                            queues=queues or QueueOptions(max_polling_interval_s=0.5))
        devhost_options = DevhostOptions(only_functions=functions, static_dir=static_dir, **options)  # type: ignore[arg-type]
        handle = start_devhost_in_process(make_app(recorder), all_settings, config=config, options=devhost_options,
                                          port=port)
        hosted = Hosted(handle, recorder, all_settings)
        started.append(hosted)
        return hosted

    yield factory
    for hosted in started:
        hosted.stop(0)


@pytest.fixture
def work_queue(azurite) -> Iterator[tuple[dict[str, str], QueueClient]]:  # type: ignore[no-untyped-def]
    """Settings naming a fresh work queue in Azurite, and a client for it (messages base64, as the host)."""
    name = unique_name("work")
    client = QueueClient.from_connection_string(azurite.connection_string, name)
    client.create_queue()
    yield {"AzureWebJobsStorage": azurite.connection_string, "WORK_QUEUE": name}, client
    client.close()
