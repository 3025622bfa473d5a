"""HTTP triggers under the devhost: routing, methods, bodies, headers, responses, static files."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.devhost.conftest import HostFactory
from tests.paths import ROOT


def test_route_parameters_query_and_headers_reach_the_function(host_sample: HostFactory) -> None:
    host = host_sample()
    response = requests.get(host.url("/api/echo/42/alice?x=1&y=two"), headers={"X-Custom": "hello"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Echo"] == "yes"
    body = response.json()
    assert body["method"] == "GET"
    assert body["route"] == {"id": "42", "name": "alice"}
    assert body["params"] == {"x": "1", "y": "two"}
    assert body["header"] == "hello"
    assert body["url"] == host.url("/api/echo/42/alice?x=1&y=two")


def test_optional_parameter_may_be_absent_and_body_arrives_intact(host_sample: HostFactory) -> None:
    host = host_sample()
    payload = '{"subject": "Grüße", "n": 1}'
    response = requests.post(host.url("/api/echo/7"), data=payload.encode(),
                             headers={"Content-Type": "application/json; charset=utf-8"}, timeout=10)
    body = response.json()
    assert body["route"] == {"id": "7"}
    assert body["method"] == "POST"
    assert body["body"] == payload
    assert body["content_type"] == "application/json; charset=utf-8"


def test_wrong_method_is_405_with_allow(host_sample: HostFactory) -> None:
    host = host_sample()
    response = requests.delete(host.url("/api/echo/1"), timeout=10)
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "POST"}
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_unknown_route_and_failed_constraint_are_404(host_sample: HostFactory) -> None:
    host = host_sample()
    for path in ("/api/nothing-here", "/api/echo/not-a-number", "/api/echo/1/2/3", "/api"):
        response = requests.get(host.url(path), timeout=10)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_literal_segment_wins_over_parameter_whatever_the_order(host_sample: HostFactory) -> None:
    host = host_sample()
    assert requests.get(host.url("/api/things/new"), timeout=10).text == "literal"
    assert requests.get(host.url("/api/things/NEW"), timeout=10).text == "literal"  # literals ignore case
    assert requests.get(host.url("/api/things/old"), timeout=10).text == "param:old"


def test_catch_all_and_string_return(host_sample: HostFactory) -> None:
    host = host_sample()
    response = requests.get(host.url("/api/files/a/b%20c/d.txt"), timeout=10)
    assert response.status_code == 200
    assert response.text == "a/b c/d.txt"
    assert response.headers["Content-Type"].startswith("text/plain")


def test_status_and_headers_from_http_response(host_sample: HostFactory) -> None:
    host = host_sample()
    response = requests.get(host.url("/api/status/418"), timeout=10)
    assert response.status_code == 418
    assert response.headers["X-Status"] == "set"


def test_unhandled_exception_is_500_without_details(host_sample: HostFactory) -> None:
    host = host_sample()
    response = requests.get(host.url("/api/crash"), timeout=10)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text


def test_async_function(host_sample: HostFactory) -> None:
    host = host_sample()
    assert requests.get(host.url("/api/async"), timeout=10).text == "async ok"


def test_route_prefix_comes_from_host_config(host_sample: HostFactory) -> None:
    host = host_sample(route_prefix="")
    assert requests.get(host.url("/echo/5"), timeout=10).json()["route"] == {"id": "5"}


def test_static_files_share_the_origin(host_sample: HostFactory, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>page</h1>")
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "app.js").write_text("console.log(1)")
    (tmp_path.parent / "secret.txt").write_text("no")
    host = host_sample(static_dir=tmp_path)
    root = requests.get(host.url("/"), timeout=10)
    assert root.status_code == 200 and root.text == "<h1>page</h1>"
    assert root.headers["Content-Type"].startswith("text/html")
    assert requests.get(host.url("/js/app.js"), timeout=10).text == "console.log(1)"
    assert requests.get(host.url("/missing.css"), timeout=10).status_code == 404
    assert requests.get(host.url("/%2e%2e/secret.txt"), timeout=10).status_code == 404
    assert requests.post(host.url("/index.html"), timeout=10).status_code == 404
    # The API still answers under its prefix.
    assert requests.get(host.url("/api/echo/1"), timeout=10).status_code == 200


def test_static_files_carry_the_static_web_apps_global_headers(host_sample: HostFactory, tmp_path: Path) -> None:
    """The devhost sends what staticwebapp.config.json's globalHeaders tell Static Web Apps to send."""
    (tmp_path / "index.html").write_text("<h1>page</h1>")
    (tmp_path / "staticwebapp.config.json").write_text(
        '{"globalHeaders": {"Content-Security-Policy": "default-src \'none\'", "X-Frame-Options": "DENY"}}')
    host = host_sample(static_dir=tmp_path)
    page = requests.get(host.url("/"), timeout=10)
    assert page.headers["Content-Security-Policy"] == "default-src 'none'"
    assert page.headers["X-Frame-Options"] == "DENY"
    assert requests.get(host.url("/staticwebapp.config.json"), timeout=10).status_code == 404, "not served"


def test_the_real_pages_get_a_strict_policy(host_sample: HostFactory) -> None:
    host = host_sample(static_dir=ROOT / "static_web")
    for path in ("/", "/index.html", "/data.html", "/common.js", "/app.css"):
        answer = requests.get(host.url(path), timeout=10)
        assert answer.status_code == 200, path
        csp = {d.split()[0]: d.split()[1:] for d in answer.headers["Content-Security-Policy"].split("; ")}
        assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"], "no inline script"
        assert csp["style-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
        assert "'self'" in csp["connect-src"] and "wss://*.service.signalr.net" in csp["connect-src"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"


def test_host_status_endpoint(host_sample: HostFactory) -> None:
    host = host_sample()
    status = requests.get(host.url("/admin/host/status"), timeout=10).json()
    assert status["state"] == "Running"
    assert "echo" in status["functions"]
