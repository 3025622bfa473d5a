"""Where an in-process request's time goes: spans around chosen methods, tagged with the invocation.

For a benchmark that hosts the app in its own process (``Stack.start_host_in_process``)::

    spans = CallSpans()
    spans.wrap(SearchStore, "get_message", "upsert_messages")
    spans.wrap_async(Bindings, "write")
    ... the requests ...
    for span in spans.of("message_update", since=started): ...

Each span records the method, its start and end (``time.monotonic``, the
clock the benchmark's own timings use), its thread and the log context's
``function`` and ``invocation_id`` (``mailsync.logs.log_context``: the
devhost sets them around every invocation, and the context is copied into
the threads the service starts), so the calls of one request can be told
from those of the worker running beside it. The wrappers cost a few µs a
call; the figures are for finding the slow step, not for the goal lines.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mailsync.logs import _context


@dataclass(frozen=True)
class Span:
    name: str              # Class.method
    function: str          # the invocation's function ("" outside one)
    invocation: str
    started: float
    ended: float
    thread: str

    @property
    def ms(self) -> float:
        return (self.ended - self.started) * 1000


class CallSpans:
    """Wraps methods of classes (for the life of the process) and keeps a span per call."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    def _record(self, name: str, started: float) -> None:
        fields = _context.get()
        span = Span(name, fields.get("function", ""), fields.get("invocation_id", ""), started, time.monotonic(),
                    threading.current_thread().name)
        with self._lock:
            self._spans.append(span)

    def wrap(self, cls: type, *methods: str) -> None:
        for method in methods:
            original = getattr(cls, method)
            name = f"{cls.__name__}.{method}"

            def timed(*args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
                started = time.monotonic()
                try:
                    return __original(*args, **kwargs)
                finally:
                    self._record(__name, started)

            setattr(cls, method, functools.wraps(original)(timed))

    def wrap_async(self, cls: type, *methods: str) -> None:
        for method in methods:
            original = getattr(cls, method)
            name = f"{cls.__name__}.{method}"

            async def timed(*args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
                started = time.monotonic()
                try:
                    return await __original(*args, **kwargs)
                finally:
                    self._record(__name, started)

            setattr(cls, method, functools.wraps(original)(timed))

    def of(self, function: str, since: float, until: float = float("inf")) -> list[Span]:
        """The spans of ``function``'s invocations that started in [since, until), by start."""
        with self._lock:
            found = [s for s in self._spans if s.function == function and since <= s.started < until]
        return sorted(found, key=lambda s: s.started)


def timeline(spans: Iterable[Span], origin: float) -> str:
    """``name +start..end ms`` per span, relative to ``origin`` (one request's send time)."""
    return "  ".join(f"{s.name} +{(s.started - origin) * 1000:.0f}..{(s.ended - origin) * 1000:.0f}"
                     for s in spans)
