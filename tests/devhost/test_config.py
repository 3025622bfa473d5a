"""host.json and local.settings.json as the devhost reads them; indexing of app settings and bindings."""

from __future__ import annotations

import json
from pathlib import Path

import azure.functions as func
import pytest

from devhost.config import (
    ConfigError,
    HostConfig,
    load_host_config,
    load_local_settings,
    merge_settings,
    parse_timespan,
)
from devhost.index import IndexingError, index_app
from tests.devhost.sample_app import SETTINGS, Recorder, make_app

ROOT = Path(__file__).resolve().parents[2]


def test_project_host_json_is_valid_and_sets_what_the_devhost_honours() -> None:
    config = load_host_config(ROOT / "host.json")
    assert config.route_prefix == "api"
    assert config.queues.message_encoding == "base64"
    assert 1 <= config.queues.batch_size <= 32
    assert config.queues.max_dequeue_count >= 1
    assert config.function_timeout_s is not None and config.function_timeout_s > 0
    doc = json.loads((ROOT / "host.json").read_text())
    assert doc["version"] == "2.0"
    assert doc["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"


def test_timespans() -> None:
    assert parse_timespan("00:00:30") == 30
    assert parse_timespan("01:02:03.5") == 3723.5
    assert parse_timespan("1.00:00:00") == 86400
    with pytest.raises(ConfigError):
        parse_timespan("30s")


def test_host_json_defaults_and_errors() -> None:
    defaults = HostConfig.from_dict({"version": "2.0"})
    assert (defaults.route_prefix, defaults.queues.batch_size, defaults.queues.max_dequeue_count) == ("api", 16, 5)
    assert HostConfig.from_dict({"functionTimeout": "-1"}).function_timeout_s is None
    for bad in ({"version": "1.0"}, {"extensions": {"queues": {"batchSize": 0}}},
                {"extensions": {"queues": {"batchSize": 64}}}, {"extensions": {"queues": {"visibilityTimeout": 30}}},
                {"extensions": {"queues": {"messageEncoding": "utf8"}}}, {"extensions": []}):
        with pytest.raises(ConfigError):
            HostConfig.from_dict(bad)


def test_local_settings_values_and_environment_precedence(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": {"A": "from-file", "B": "file", "N": 3}}))
    values = load_local_settings(path)
    assert values == {"A": "from-file", "B": "file", "N": "3"}
    assert merge_settings(values, {"A": "from-env"}) == {"A": "from-env", "B": "file", "N": "3"}
    assert load_local_settings(tmp_path / "absent.json") == {}
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        load_local_settings(path)


def test_sample_settings_file_parses() -> None:
    values = load_local_settings(ROOT / "local.settings.sample.json")
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert "AzureWebJobsStorage" in values


def test_setting_expressions_resolve_at_indexing() -> None:
    specs = {s.name: s for s in index_app(make_app(Recorder()), {**SETTINGS, "WORK_QUEUE": "q-one"})}
    assert specs["worker"].trigger.get("queueName") == "q-one"
    assert specs["enqueue"].output("out").get("queueName") == "q-one"  # type: ignore[union-attr]
    assert specs["tick"].trigger.get("schedule") == SETTINGS["TICK_SCHEDULE"]
    assert specs["worker"].trigger.get("connection") == "AzureWebJobsStorage"  # names a setting: left as is


def test_missing_setting_fails_indexing_with_its_name() -> None:
    with pytest.raises(IndexingError, match="WORK_QUEUE"):
        index_app(make_app(Recorder()), {"TICK_SCHEDULE": "* * * * * *", "HUB": "h"})


def test_parameters_without_bindings_are_refused() -> None:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="x")
    def broken(req: func.HttpRequest, extra: str) -> func.HttpResponse:
        return func.HttpResponse("")

    with pytest.raises(IndexingError, match="extra"):
        index_app(app, {})


def test_unsupported_bindings_are_refused_not_ignored() -> None:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="x")
    @app.blob_output(arg_name="blob", path="c/b.txt", connection="AzureWebJobsStorage")
    def uses_blob(req: func.HttpRequest, blob: func.Out[str]) -> func.HttpResponse:
        return func.HttpResponse("")

    with pytest.raises(IndexingError, match="blob"):
        index_app(app, {})
