"""Binding expressions and the output/input bindings shared by every trigger.

Binding expressions are the ``{...}`` parts of binding properties, resolved
per invocation from the trigger's data: for HTTP, ``{headers.<name>}``,
``{query.<name>}``, route parameters and top-level properties of a JSON
body; anywhere, ``{rand-guid}`` and ``{datetime}``. A name with no value
fails the invocation, as in Azure ("Error while accessing 'x': property
doesn't exist").
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from devhost.index import Binding, FunctionSpec
from devhost.invoke import Invocation
from devhost.queues import BindingError, QueueClients, encode_body, queue_output_bodies
from devhost.signalr import SignalRError, SignalRService, parse_output

_EXPRESSION = re.compile(r"\{([^{}]+)\}")


def resolve_expression(template: str, data: Mapping[str, Any]) -> str:
    """Fill ``{...}`` expressions in ``template`` from the trigger's binding data."""

    def lookup(match: re.Match[str]) -> str:
        path = match.group(1).strip()
        if path.lower() == "rand-guid":
            return str(uuid.uuid4())
        if path.lower() == "datetime":
            return datetime.now(UTC).isoformat()
        value: Any = data
        for part in path.split("."):
            if isinstance(value, Mapping):
                # Headers and query keys are case-insensitive; route values and body properties are not.
                if part in value:
                    value = value[part]
                    continue
                lowered = {str(k).lower(): v for k, v in value.items()}
                if part.lower() in lowered:
                    value = lowered[part.lower()]
                    continue
            raise BindingError(f"Error while accessing '{part}': property doesn't exist (binding expression "
                               f"{{{path}}})")
        if isinstance(value, Mapping | list):
            return orjson.dumps(value).decode()
        return str(value)

    return _EXPRESSION.sub(lookup, template)


def http_binding_data(headers: Mapping[str, str], query: Mapping[str, str], route: Mapping[str, str],
                      body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = {}
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        data.update(doc)
    data.update(route)
    data["headers"] = {k.lower(): v for k, v in headers.items()}
    data["query"] = dict(query)
    return data


class Bindings:
    """Input values before an invocation, output writes after it."""

    def __init__(self, queues: QueueClients, signalr: SignalRService, message_encoding: str) -> None:
        self.queues = queues
        self.signalr = signalr
        self._encoding = message_encoding

    def inputs(self, spec: FunctionSpec, data: Mapping[str, Any], *, signalr_endpoint: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for binding in spec.inputs:
            if binding.type == "signalRConnectionInfo":
                values[binding.name] = self._connection_info(binding, data, signalr_endpoint)
        return values

    def _connection_info(self, binding: Binding, data: Mapping[str, Any], endpoint: str) -> str:
        hub = binding.get("hubName")
        if not hub:
            raise BindingError(f"signalRConnectionInfo binding {binding.name!r} has no hubName")
        user = binding.get("userId")
        user_id = resolve_expression(str(user), data) if user else None
        return orjson.dumps(self.signalr.connection_info(hub, user_id or None, endpoint)).decode()

    async def write(self, spec: FunctionSpec, invocation: Invocation, data: Mapping[str, Any]) -> None:
        """Write every output binding the function set (HTTP responses are the caller's)."""
        for binding in spec.outputs:
            if binding.type == "http":
                continue
            value = invocation.output(binding.name)
            if value is None:
                continue
            if binding.type == "queue":
                queue = resolve_expression(str(binding.get("queueName") or ""), data)
                if not queue:
                    raise BindingError(f"queue output {binding.name!r} has no queueName")
                contents = [encode_body(body, self._encoding) for body in queue_output_bodies(value)]
                await self.queues.send(binding.get("connection"), queue, contents)
            elif binding.type == "signalR":
                hub = binding.get("hubName")
                if not hub:
                    raise BindingError(f"signalR output {binding.name!r} has no hubName")
                try:
                    items = parse_output(value)
                except SignalRError as exc:
                    raise BindingError(f"function {spec.name}: {exc}") from exc
                for item in items:
                    await self.signalr.send(hub, item)
