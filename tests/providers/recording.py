"""A Graph transport that records each exchange, for tests that check what the client sent and got."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailsync.providers.graph_transport import GraphResponse, GraphTransport


@dataclass(frozen=True)
class SentRequest:
    method: str
    url: str                  # with its query, as sent
    headers: Mapping[str, str]
    body: bytes | None


@dataclass(frozen=True)
class Exchange:
    request: SentRequest
    status: int
    content: bytes


class RecordingTransport:
    """Sends through ``inner`` and hands every exchange to ``record``."""

    def __init__(self, inner: GraphTransport, record: Callable[[Exchange], Any]) -> None:
        self._inner = inner
        self._record = record

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, timeout_s: float,
             max_bytes: int | None = None) -> GraphResponse:
        response = self._inner.send(method, url, headers, body, timeout_s=timeout_s, max_bytes=max_bytes)
        self._record(Exchange(SentRequest(method, url, dict(headers), body), response.status, response.body))
        return response

    def close(self) -> None:
        self._inner.close()
