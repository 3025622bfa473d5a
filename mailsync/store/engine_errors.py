"""Engine errors in the project's terms: what a caller retries (StoreUnavailable) and what it does not (StoreError).

Every store module reaches the cluster through :class:`~mailsync.store.engine.SearchEngine`,
whose calls raise :class:`~mailsync.store.engine.EngineError`; nothing above the store
sees one. Unreachable, 429 and 5xx mean "try again later"; anything else answered
is a refusal. Reasons are shortened, and the slice of the refused value that
Elasticsearch quotes in mapping errors (message content) is cut off before logging.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from mailsync.errors import StoreError, StoreUnavailable
from mailsync.store.engine import EngineError

# Elasticsearch quotes a slice of the refused value in mapping errors; that
# is message content and stays out of the logs (the dead letter keeps it).
_VALUE_PREVIEW_RE = re.compile(r"\s*Preview of field's value:.*$", re.DOTALL)


def short_reason(reason: str) -> str:
    """The engine's reason without quoted content, at most 500 characters."""
    return _VALUE_PREVIEW_RE.sub("", reason)[:500]


def error_parts(item: Mapping[str, Any]) -> tuple[str, str]:
    """``(error type, reason)`` of one bulk item's answer."""
    error = item.get("error")
    if isinstance(error, dict):
        return str(error.get("type", "unknown")), str(error.get("reason", ""))
    if error is None:
        return str(item.get("result", "unknown")), ""
    return "error", str(error)


def raise_store_error(what: str, exc: EngineError) -> NoReturn:
    """Translate an engine error into the project's errors (503-worthy ones to StoreUnavailable)."""
    if not exc.answered:
        raise StoreUnavailable(f"{what}: search store unreachable ({exc.error_type})", retry_after_s=5.0) from exc
    detail = f"{what}: {exc.status} {exc.error_type} {short_reason(exc.reason)}".strip()
    if exc.status == 429 or exc.status >= 500:
        raise StoreUnavailable(detail, retry_after_s=5.0) from exc
    raise StoreError(detail) from exc


@contextlib.contextmanager
def translating(what: str) -> Iterator[None]:
    """``with translating("get_message"):`` — EngineErrors inside become the project's errors."""
    try:
        yield
    except EngineError as exc:
        raise_store_error(what, exc)
