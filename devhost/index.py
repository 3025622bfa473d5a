"""Function indexing: what the Functions host learns from ``app.get_functions()``.

The devhost reads the same metadata the Azure host receives from the
Python worker: each function's name, its raw binding dictionaries and the
user function. Nothing (routes, queue names, schedules) is written twice.
App-setting expressions (``%SYNC_QUEUE_NAME%``) are resolved here, once,
and an unresolvable one fails indexing as it does in Azure.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func

TRIGGER_TYPES = frozenset({"httpTrigger", "queueTrigger", "timerTrigger"})
INPUT_TYPES = frozenset({"signalRConnectionInfo"})
OUTPUT_TYPES = frozenset({"http", "queue", "signalR"})

# Binding properties that name things rather than hold values: never %resolved%.
_LITERAL_KEYS = frozenset({"name", "type", "direction", "connection", "connectionStringSetting", "authLevel"})
_SETTING_EXPR = re.compile(r"%([^%]+)%")


class IndexingError(Exception):
    """The app cannot be hosted as written; the message names the function and binding."""


@dataclass(frozen=True)
class Binding:
    """One binding with its app-setting expressions resolved."""

    name: str
    type: str
    direction: str
    props: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.props.get(key, default)


@dataclass
class FunctionSpec:
    """A function as the devhost runs it."""

    name: str
    func: Callable[..., Any]
    trigger: Binding
    inputs: list[Binding] = field(default_factory=list)
    outputs: list[Binding] = field(default_factory=list)
    is_async: bool = False
    context_param: str | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    @property
    def trigger_type(self) -> str:
        return self.trigger.type

    def output(self, name: str) -> Binding | None:
        return next((b for b in self.outputs if b.name == name), None)


def load_app(spec: str) -> func.FunctionApp:
    """Import ``module[:attribute]`` and return its FunctionApp (``app`` by default)."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        app = getattr(module, attr, None)
    else:
        app = getattr(module, "app", None)
        if not isinstance(app, func.FunctionApp):
            app = next((v for v in vars(module).values() if isinstance(v, func.FunctionApp)), None)
    if not isinstance(app, func.FunctionApp):
        raise IndexingError(f"{spec}: no azure.functions.FunctionApp found")
    return app


def resolve_setting_expressions(value: str, settings: Mapping[str, str], where: str) -> str:
    """Replace each ``%NAME%`` by the app setting NAME; a missing setting is an indexing error."""

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in settings:
            raise IndexingError(f"{where}: '%{key}%' does not resolve to a value (no app setting {key})")
        return settings[key]

    return _SETTING_EXPR.sub(substitute, value)


def _resolve(raw: Mapping[str, Any], settings: Mapping[str, str], where: str) -> Binding:
    props: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and key not in _LITERAL_KEYS:
            value = resolve_setting_expressions(value, settings, f"{where} {key}")
        props[key] = value
    direction = str(raw.get("direction", "IN")).upper()
    return Binding(name=str(raw["name"]), type=str(raw["type"]), direction=direction, props=props)


def index_app(app: func.FunctionApp, settings: Mapping[str, str],
              only: frozenset[str] | None = None) -> list[FunctionSpec]:
    """Index every function of ``app`` (optionally only the named ones).

    ``app.get_functions()`` may be called once per app object (a second
    call fails the library's duplicate-name check), so the caller indexes
    once and keeps the result.
    """
    specs: list[FunctionSpec] = []
    for function in app.get_functions():
        name = str(function.get_function_name())
        if only is not None and name not in only:
            continue
        bindings = [_resolve(json.loads(raw), settings, f"function {name} binding")
                    for raw in function.get_raw_bindings()]
        triggers = [b for b in bindings if b.type.endswith("Trigger")]
        if len(triggers) != 1:
            raise IndexingError(f"function {name}: expected exactly one trigger, found {len(triggers)}")
        trigger = triggers[0]
        if trigger.type not in TRIGGER_TYPES:
            raise IndexingError(f"function {name}: trigger type {trigger.type} is not supported by the devhost "
                                f"(supported: {', '.join(sorted(TRIGGER_TYPES))})")
        user_function = function.get_user_function()
        spec = FunctionSpec(name=name, func=user_function, trigger=trigger,
                            is_async=inspect.iscoroutinefunction(user_function))
        for binding in bindings:
            if binding is trigger:
                continue
            if binding.direction == "OUT":
                if binding.type not in OUTPUT_TYPES:
                    raise IndexingError(f"function {name}: output binding type {binding.type} is not supported")
                spec.outputs.append(binding)
            else:
                if binding.type not in INPUT_TYPES:
                    raise IndexingError(f"function {name}: input binding type {binding.type} is not supported")
                spec.inputs.append(binding)
        _check_signature(spec)
        specs.append(spec)
    return specs


def _check_signature(spec: FunctionSpec) -> None:
    """Every parameter must be a binding (or ``context``), as the Python worker requires."""
    signature = inspect.signature(spec.func)
    try:
        hints = typing.get_type_hints(spec.func)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {k: p.annotation for k, p in signature.parameters.items() if p.annotation is not p.empty}
    names = {spec.trigger.name} | {b.name for b in spec.inputs} | {b.name for b in spec.outputs}
    for param in signature.parameters.values():
        if param.name in names:
            spec.annotations[param.name] = hints.get(param.name)
            continue
        if param.name == "context" or hints.get(param.name) is func.Context:
            spec.context_param = param.name
            continue
        if param.default is param.empty:
            raise IndexingError(f"function {spec.name}: parameter {param.name!r} has no binding")
    for binding in [spec.trigger, *spec.inputs, *spec.outputs]:
        if binding.name != "$return" and binding.name not in signature.parameters:
            raise IndexingError(f"function {spec.name}: binding {binding.name!r} has no parameter")
