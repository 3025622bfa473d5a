"""The page's HTTP surface under the devhost: Azurite, the search store, the Graph sandbox.

``web_env(...)`` builds the app settings every web test module uses (its
own queue, tables and index prefix; a SignalR AccessKey the tests know, so
they can check tokens and publish through the service's REST API).
``WebHost`` wraps a started devhost with small HTTP helpers;
``web_host_fixture(functions)`` is a module's ``web`` fixture serving them.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from devhost.services.process import free_port
from mailsync.settings import Settings
from tests.fixtures.devhost import DevhostProcess, app_settings, start_devhost

KEY_ENTRY = f"web1:{base64.b64encode(bytes(range(90, 122))).decode()}"
SIGNALR_KEY = "web-tests-signalr-access-key-0123456789abcdef"


def web_env(*, connection_string: str, search_store_url: str, sandbox_url: str, port: int, local_dir: Path,
            **extra: str) -> dict[str, str]:
    """App settings for a devhost on ``port`` (chosen first: the SignalR connection string names it)."""
    signalr = f"Endpoint=http://127.0.0.1:{port}/signalr;AccessKey={SIGNALR_KEY};Version=1.0;"
    web = {"GRAPH_SANDBOX_URL": sandbox_url, "SIGNALR_HUB": "mailsync", "AzureSignalRConnectionString": signalr}
    return app_settings(name="web", storage=connection_string, search_store_url=search_store_url, port=port,
                        local_dir=local_dir, key_entry=KEY_ENTRY, **{**web, **extra})


@dataclass
class WebHost:
    host: DevhostProcess
    env: dict[str, str]

    @property
    def api(self) -> str:
        return f"{self.host.base_url}/api"

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def create_account(self) -> tuple[str, str]:
        """A new local account (status linking): (account_id, access_token)."""
        response = requests.post(f"{self.api}/accounts", json={"provider": "outlook"}, timeout=30)
        assert response.status_code == 201, response.text
        body = response.json()
        return body["account_id"], body["access_token"]

    def get(self, path: str, token: str | None, **params: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return requests.get(f"{self.api}/{path}", headers=headers, params=params, timeout=30)


@contextlib.contextmanager
def running_web_host(*, connection_string: str, search_store_url: str, sandbox_url: str,
                     tmp_path_factory: Any, functions: list[str]) -> Iterator[WebHost]:
    """A devhost serving ``functions`` on a free port (``web_env``'s settings), stopped on the way out."""
    port = free_port()
    env = web_env(connection_string=connection_string, search_store_url=search_store_url, sandbox_url=sandbox_url,
                  port=port, local_dir=tmp_path_factory.mktemp("local"))
    host = start_devhost(env, port=port, functions=functions, log_dir=tmp_path_factory.mktemp("devhost"))
    try:
        yield WebHost(host, env)
    finally:
        host.stop(timeout_s=15)


def web_host_fixture(functions: list[str]) -> Callable[..., Iterator[WebHost]]:
    """A module-scoped fixture (assign it to ``web``) running a devhost that serves ``functions``."""

    @pytest.fixture(scope="module")
    def web(azurite: Any, search_store_url: str, graph_sandbox: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebHost]:
        with running_web_host(connection_string=azurite.connection_string, search_store_url=search_store_url,
                              sandbox_url=graph_sandbox.base_url, tmp_path_factory=tmp_path_factory,
                              functions=functions) as web:
            yield web

    return web
