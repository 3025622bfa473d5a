"""One logging set-up for the functions and the devhost.

Standard ``logging`` (so Application Insights picks records up in Azure),
one JSON object per line locally. Context (account id, job id, function
name) rides in a ContextVar so every record of a handler carries it
without threading it through calls. Never log a token, code, password or
message body: the formatter also masks values of sensitive keys passed as
``extra``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

# The default dict is never mutated: log_context copies before setting.
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("mailsync_log_context", default={})  # noqa: B039

SENSITIVE_KEYS = frozenset({
    "access_token", "refresh_token", "id_token", "token", "code", "password", "secret",
    "client_secret", "authorization", "client_state", "clientstate", "body", "code_verifier",
})
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add fields (account_id, job_id, function, ...) to every record logged inside."""
    merged = dict(_context.get())
    merged.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context.get())
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            entry[key] = "***" if key.lower() in SENSITIVE_KEYS else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class ContextFilter(logging.Filter):
    """Copies the context onto records so non-JSON handlers (App Insights) see it too."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Install the one handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_mailsync", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._mailsync = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter that would drown the sync logs (and can echo URLs with codes).
    # opensearch-py logs every request at INFO (~5 lines per mailbox change, each a JSON record).
    for noisy in ("azure", "urllib3", "elastic_transport", "opensearch", "msal", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
