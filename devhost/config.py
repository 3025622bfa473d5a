"""host.json, local.settings.json and the environment, read the way the Functions host reads them.

``func start`` puts ``local.settings.json``'s ``Values`` into the process
environment, except where a variable is already set (the environment
wins). ``host.json`` carries the host-wide knobs the devhost honours:
``extensions.http.routePrefix``, ``extensions.queues.*`` and
``functionTimeout``. Anything else in it is accepted and ignored, as a
newer host.json must not stop an older host.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """host.json or local.settings.json is malformed; the message says where."""


# Azure's defaults (Functions host 4.x, queue extension 5.x).
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_DEQUEUE_COUNT = 5
DEFAULT_MAX_POLLING_INTERVAL_S = 60.0
DEFAULT_FUNCTION_TIMEOUT_S = 300.0

_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d+)?)$")


def parse_timespan(value: str) -> float:
    """Seconds in a .NET TimeSpan string (``hh:mm:ss``, ``d.hh:mm:ss``, fractional seconds allowed)."""
    match = _TIMESPAN.match(value.strip())
    if not match:
        raise ConfigError(f"{value!r} is not a TimeSpan like 00:05:00")
    days = int(match["days"] or 0)
    return days * 86400 + int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])


@dataclass(frozen=True)
class QueueOptions:
    """``extensions.queues`` of host.json.

    ``visibility_timeout_s`` is what Azure means by it: how long a message
    whose invocation FAILED stays invisible before the next attempt (the
    retry delay). While an invocation runs, the message is held by a
    separate, renewed lease.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    max_dequeue_count: int = DEFAULT_MAX_DEQUEUE_COUNT
    visibility_timeout_s: float = 0.0
    max_polling_interval_s: float = DEFAULT_MAX_POLLING_INTERVAL_S
    message_encoding: str = "base64"


@dataclass(frozen=True)
class HostConfig:
    """What the devhost reads from host.json."""

    route_prefix: str = "api"
    function_timeout_s: float | None = DEFAULT_FUNCTION_TIMEOUT_S
    queues: QueueOptions = field(default_factory=QueueOptions)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> HostConfig:
        if not isinstance(doc, Mapping):
            raise ConfigError("host.json must hold a JSON object")
        version = doc.get("version")
        if version is not None and version != "2.0":
            raise ConfigError(f"host.json version must be \"2.0\", got {version!r}")
        extensions = _object(doc, "extensions")
        http = _object(extensions, "http")
        queues = _object(extensions, "queues")

        route_prefix = http.get("routePrefix", "api")
        if not isinstance(route_prefix, str):
            raise ConfigError("host.json extensions.http.routePrefix must be a string")

        timeout_raw = doc.get("functionTimeout")
        timeout: float | None = DEFAULT_FUNCTION_TIMEOUT_S
        if timeout_raw is not None:
            if not isinstance(timeout_raw, str):
                raise ConfigError("host.json functionTimeout must be a TimeSpan string")
            timeout = None if timeout_raw.strip() == "-1" else parse_timespan(timeout_raw)

        encoding = queues.get("messageEncoding", "base64")
        if encoding not in ("base64", "none"):
            raise ConfigError("host.json extensions.queues.messageEncoding must be \"base64\" or \"none\"")
        options = QueueOptions(
            batch_size=_positive_int(queues, "batchSize", DEFAULT_BATCH_SIZE, maximum=32),
            max_dequeue_count=_positive_int(queues, "maxDequeueCount", DEFAULT_MAX_DEQUEUE_COUNT),
            visibility_timeout_s=_timespan_field(queues, "visibilityTimeout", 0.0),
            max_polling_interval_s=_timespan_field(queues, "maxPollingInterval", DEFAULT_MAX_POLLING_INTERVAL_S),
            message_encoding=encoding,
        )
        return cls(route_prefix=route_prefix.strip("/"), function_timeout_s=timeout, queues=options)


def _object(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"host.json {key} must be an object")
    return value


def _positive_int(doc: Mapping[str, Any], key: str, default: int, *, maximum: int | None = None) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"host.json extensions.queues.{key} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"host.json extensions.queues.{key} must be at most {maximum}, got {value}")
    return value


def _timespan_field(doc: Mapping[str, Any], key: str, default: float) -> float:
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"host.json extensions.queues.{key} must be a TimeSpan string like 00:00:30")
    return parse_timespan(value)


def load_host_config(path: Path) -> HostConfig:
    """Read host.json (defaults when the file is absent)."""
    if not path.exists():
        return HostConfig()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return HostConfig.from_dict(doc)


def load_local_settings(path: Path) -> dict[str, str]:
    """The ``Values`` of local.settings.json ({} when the file is absent)."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if doc.get("IsEncrypted"):
        raise ConfigError(f"{path} is encrypted (IsEncrypted: true); the devhost reads plain values only")
    values = doc.get("Values") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: Values must be an object")
    settings: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{path}: Values.{key} must be a string")
        settings[key] = str(value)
    return settings


def merge_settings(local_values: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """App settings as the host sees them: local.settings.json Values, overridden by the environment."""
    merged = dict(local_values)
    merged.update(environ)
    return merged
