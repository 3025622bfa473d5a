"""A small Function App exercising what the devhost hosts; each test builds a fresh one.

``app.get_functions()`` may be called once per app object, so tests call
``make_app(recorder)`` for every devhost they start. The recorder is how a
test sees what the functions did (same process).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func


@dataclass
class Call:
    function: str
    data: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


class Recorder:
    """Thread-safe record of invocations, with a wait helper and a gate blocking functions can wait on."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.release = threading.Event()
        self._cond = threading.Condition()

    def add(self, function: str, **data: Any) -> None:
        with self._cond:
            self.calls.append(Call(function, data))
            self._cond.notify_all()

    def of(self, function: str) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.function == function]

    def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s; calls: {self.calls!r}")
                self._cond.wait(remaining)


def make_app(recorder: Recorder) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.function_name("echo")
    @app.route(route="echo/{id:int}/{name?}", methods=["GET", "POST"])
    def echo(req: func.HttpRequest) -> func.HttpResponse:
        body = {"method": req.method, "url": req.url, "route": dict(req.route_params), "params": dict(req.params),
                "header": req.headers.get("X-Custom"), "content_type": req.headers.get("content-type"),
                "body": req.get_body().decode("utf-8")}
        return func.HttpResponse(json.dumps(body), mimetype="application/json", headers={"X-Echo": "yes"})

    @app.function_name("things_new")
    @app.route(route="things/new", methods=["GET"])
    def things_new(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("literal")

    @app.function_name("things_by_name")
    @app.route(route="things/{name}", methods=["GET"])
    def things_by_name(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(f"param:{req.route_params['name']}")

    @app.function_name("files")
    @app.route(route="files/{*path}", methods=["GET"])
    def files(req: func.HttpRequest) -> str:
        return req.route_params.get("path", "")

    @app.function_name("status")
    @app.route(route="status/{code:int}", methods=["GET"])
    def status(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(status_code=int(req.route_params["code"]), headers={"X-Status": "set"})

    @app.function_name("crash")
    @app.route(route="crash", methods=["GET"])
    def crash(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("secret detail that must not leak")

    @app.function_name("async_hello")
    @app.route(route="async", methods=["GET"])
    async def async_hello(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("async ok")

    @app.function_name("enqueue")
    @app.route(route="enqueue", methods=["POST"])
    @app.queue_output(arg_name="out", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
    def enqueue(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
        messages = json.loads(req.get_body())
        out.set([json.dumps(m) for m in messages])
        return func.HttpResponse(status_code=202)

    @app.function_name("worker")
    @app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
    def worker(msg: func.QueueMessage) -> None:
        job = msg.get_json()
        recorder.add("worker", job=job, dequeue_count=msg.dequeue_count, message_id=msg.id,
                     pop_receipt=msg.pop_receipt, inserted=msg.insertion_time)
        mode = job.get("mode", "ok")
        if mode == "fail":
            raise RuntimeError("told to fail")
        if mode.startswith("fail_until:") and msg.dequeue_count < int(mode.split(":")[1]):
            raise RuntimeError("told to fail for now")
        if mode == "block":
            # The only sign of a running invocation a test outside the devhost process can see.
            logging.getLogger("tests.devhost.sample_app").info("worker blocked on %s", job.get("id"))
            recorder.release.wait(timeout=60)
            recorder.add("worker_released", job=job)
        if mode == "slow":
            time.sleep(float(job.get("seconds", 0.5)))
        recorder.add("worker_done", job=job)

    @app.function_name("tick")
    @app.timer_trigger(arg_name="timer", schedule="%TICK_SCHEDULE%", run_on_startup=False)
    def tick(timer: func.TimerRequest) -> None:
        recorder.add("tick", past_due=timer.past_due, status=dict(timer.schedule_status))

    @app.function_name("negotiate")
    @app.route(route="negotiate", methods=["POST"])
    @app.generic_input_binding(arg_name="connection_info", type="signalRConnectionInfo", hub_name="%HUB%",
                               user_id="{headers.x-ms-signalr-userid}")
    def negotiate(req: func.HttpRequest, connection_info: str) -> func.HttpResponse:
        return func.HttpResponse(connection_info, mimetype="application/json")

    @app.function_name("notify")
    @app.route(route="notify", methods=["POST"])
    @app.generic_output_binding(arg_name="signalr", type="signalR", hub_name="%HUB%")
    def notify(req: func.HttpRequest, signalr: func.Out[str]) -> func.HttpResponse:
        signalr.set(req.get_body().decode("utf-8"))
        return func.HttpResponse(status_code=202)

    return app


SETTINGS = {"WORK_QUEUE": "devhost-work", "TICK_SCHEDULE": "*/1 * * * * *", "HUB": "testhub"}
HTTP_FUNCTIONS = frozenset({"echo", "things_new", "things_by_name", "files", "status", "crash", "async_hello"})
