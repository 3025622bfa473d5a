"""The embedded search store: osmem-server, an in-memory OpenSearch-compatible server (PyPI).

It keeps nothing across restarts; the sync engine notices the new store
generation and resyncs. Set ELASTICSEARCH_URL to use a real cluster instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from osmem_server import OsmemError, OsmemServer

from devhost.services.process import ServiceError, port_open


@dataclass
class SearchStore:
    """A running osmem-server."""

    server: OsmemServer

    @property
    def url(self) -> str:
        return str(self.server.url)

    def alive(self) -> bool:
        return self.server.process.poll() is None

    def stop(self) -> None:
        self.server.close(grace=5)


def start_search_store(host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> SearchStore:
    """Start osmem-server on ``host:port`` (0 = a free port)."""
    if port and port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use")
    try:
        server = OsmemServer.start(addr=f"{host}:{port}", startup_timeout=timeout_s, japanese=False)
    except OsmemError as exc:
        raise ServiceError(f"the search store (osmem-server) did not start: {exc}") from exc
    return SearchStore(server)
