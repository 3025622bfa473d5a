"""Health: each dependency probed for real; GET /api/health through the devhost running function_app."""

from __future__ import annotations

from collections.abc import Callable

import requests

from devhost.services.azurite import connection_string
from devhost.services.process import free_port
from mailsync.health import check_health
from mailsync.settings import Settings
from tests.fixtures.devhost import DevhostProcess


def test_all_dependencies_up(storage_settings: Settings, search_store_url: str) -> None:
    settings = Settings.from_env({"AzureWebJobsStorage": storage_settings.storage_connection_string or "",
                                  "ELASTICSEARCH_URL": search_store_url})
    report = check_health(settings).as_dict()
    assert report["status"] == "ok"
    assert {name: dep["status"] for name, dep in report["dependencies"].items()} == {  # type: ignore[attr-defined]
        "tables": "ok", "queues": "ok", "store": "ok"}


def test_store_not_configured_is_reported_but_not_fatal(storage_settings: Settings) -> None:
    report = check_health(storage_settings)
    assert report.healthy
    assert report.as_dict()["dependencies"]["store"]["status"] == "not_configured"  # type: ignore[index]


def test_unreachable_dependencies_are_unavailable_quickly_and_say_little() -> None:
    port = free_port()
    settings = Settings.from_env({"AzureWebJobsStorage": connection_string("127.0.0.1", port, port),
                                  "ELASTICSEARCH_URL": f"http://127.0.0.1:{port}"})
    report = check_health(settings)
    assert not report.healthy
    body = report.as_dict()
    assert {d["status"] for d in body["dependencies"].values()} == {"unavailable"}  # type: ignore[attr-defined]
    assert str(port) not in str(body)  # no addresses in the answer


def test_health_endpoint_through_the_devhost(devhost_factory: Callable[..., DevhostProcess],
                                             storage_env: dict[str, str], search_store_url: str) -> None:
    host = devhost_factory({**storage_env, "ELASTICSEARCH_URL": search_store_url}, functions=["health"])
    response = requests.get(f"{host.base_url}/api/health", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json()["status"] == "ok"

    port = free_port()
    down = devhost_factory({"AzureWebJobsStorage": connection_string("127.0.0.1", port, port)}, functions=["health"])
    response = requests.get(f"{down.base_url}/api/health", timeout=30)
    assert response.status_code == 503
    assert response.json()["dependencies"]["tables"]["status"] == "unavailable"
