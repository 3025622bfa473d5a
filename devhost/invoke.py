"""Calling a user function the way the Python worker does.

Sync functions run in a thread pool (``PYTHON_THREADPOOL_THREAD_COUNT``,
default ``min(32, cpus + 4)`` like the worker), async ones on the event
loop. Output bindings are ``func.Out`` objects handed in by parameter
name; the ``$return`` binding takes the return value. Outputs are only
written when the function returns normally — a failed invocation writes
nothing, as in Azure.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func
from azure.functions import _abc as func_abc

from devhost.index import FunctionSpec
from mailsync.logs import log_context

log = logging.getLogger("devhost.invoke")


class FunctionTimeout(Exception):
    """The invocation ran past host.json functionTimeout."""


class Out(func.Out):  # type: ignore[type-arg]
    """The value a function sets on an output binding."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


class _TraceContext(func_abc.TraceContext):
    def __init__(self, invocation_id: str) -> None:
        self._parent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"

    @property
    def trace_parent(self) -> str:
        return self._parent

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(func_abc.RetryContext):
    @property
    def retry_count(self) -> int:
        return 0

    @property
    def max_retry_count(self) -> int:
        return 0

    @property
    def exception(self) -> Any:
        return None


class Context(func.Context):
    """``func.Context`` for an invocation."""

    def __init__(self, invocation_id: str, function_name: str, function_directory: str) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._function_directory = function_directory
        self._local = threading.local()

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return self._local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> func_abc.TraceContext:
        return _TraceContext(self._invocation_id)

    @property
    def retry_context(self) -> func_abc.RetryContext:
        return _RetryContext()


@dataclass
class Invocation:
    """The outcome of one successful invocation: return value and output binding values."""

    invocation_id: str
    return_value: Any = None
    outputs: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Any:
        return self.return_value if name == "$return" else self.outputs.get(name)


def default_thread_count(settings: Mapping[str, str]) -> int:
    raw = settings.get("PYTHON_THREADPOOL_THREAD_COUNT")
    if raw:
        try:
            return max(1, min(32, int(raw)))
        except ValueError:
            log.warning("PYTHON_THREADPOOL_THREAD_COUNT=%r is not an integer; using the default", raw)
    return min(32, (os.cpu_count() or 1) + 4)


class Invoker:
    """Runs user functions with their arguments, under the function timeout."""

    def __init__(self, *, threads: int, function_timeout_s: float | None, function_directory: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="devhost-fn")
        self._timeout = function_timeout_s
        self._directory = function_directory

    async def invoke(self, spec: FunctionSpec, args: dict[str, Any], *, log_fields: Mapping[str, str] | None = None,
                     invocation_id: str | None = None) -> Invocation:
        """Call ``spec.func`` with trigger/input ``args``; raise whatever it raises (or FunctionTimeout)."""
        invocation_id = invocation_id or str(uuid.uuid4())
        outs = {b.name: Out() for b in spec.outputs if b.name != "$return"}
        kwargs = dict(args)
        kwargs.update(outs)
        if spec.context_param:
            kwargs[spec.context_param] = Context(invocation_id, spec.name, self._directory)
        fields = {"function": spec.name, "invocation_id": invocation_id, **(log_fields or {})}

        if spec.is_async:
            async def run_async() -> Any:
                with log_context(**fields):
                    return await spec.func(**kwargs)
            awaitable: Any = run_async()
        else:
            def run_sync() -> Any:
                with log_context(**fields):
                    return spec.func(**kwargs)
            # The worker copies the context into its threads; so do we (log context, tracing).
            context = contextvars.copy_context()
            awaitable = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(context.run, run_sync))
        try:
            if self._timeout is None:
                result = await awaitable
            else:
                result = await asyncio.wait_for(awaitable, self._timeout)
        except TimeoutError as exc:
            # A thread cannot be killed: it runs on, its result is dropped (Azure restarts the worker).
            raise FunctionTimeout(f"function {spec.name} exceeded functionTimeout ({self._timeout:g} s)") from exc
        return Invocation(invocation_id=invocation_id, return_value=result,
                          outputs={name: out.get() for name, out in outs.items()})

    def shutdown(self) -> None:
        """Stop accepting work; threads still running are abandoned, not joined."""
        self._pool.shutdown(wait=False, cancel_futures=True)
