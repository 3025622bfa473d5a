"""The embedded OpenSearch node: built only when its sources change, checked against its lock, durable across stops."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from devhost.services.process import ServiceError
from devhost.services.search_node import (
    BuildLayout,
    SearchNodeUnavailable,
    check_lock,
    java_binary,
    needs_build,
    start_search_node,
)


def _project(tmp_path: Path) -> BuildLayout:
    layout = BuildLayout(tmp_path / "node")
    (layout.project / "src" / "main" / "java").mkdir(parents=True)
    (layout.project / "pom.xml").write_text("<project/>")
    (layout.project / "src" / "main" / "java" / "Node.java").write_text("class Node {}")
    layout.lock.write_text("# header: with a colon\ng:a:jar:1:compile\n")
    return layout


def _age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_needs_a_build_until_stamped_and_again_when_a_source_changes(tmp_path: Path) -> None:
    layout = _project(tmp_path)
    assert needs_build(layout)  # never built
    layout.target.mkdir()
    for path in layout.sources():
        _age(path, 60)
    layout.stamp.touch()
    _age(layout.stamp, 30)  # file times are coarse: keep "now" clearly newer than the stamp
    assert not needs_build(layout)
    (layout.project / "src" / "main" / "java" / "Node.java").write_text("class Node { int x; }")
    assert needs_build(layout)
    _age(layout.project / "src" / "main" / "java" / "Node.java", 60)
    assert not needs_build(layout)
    layout.lock.write_text("g:a:jar:2:compile\n")  # a new lock is checked by a build
    assert needs_build(layout)


def test_lock_check_names_what_maven_resolved_differently(tmp_path: Path) -> None:
    layout = _project(tmp_path)
    layout.target.mkdir()
    layout.resolved.write_text("\nThe following files have been resolved:\n"
                               "   g:a:jar:1:compile -- module g.a\n")
    check_lock(layout)  # the module suffix and the header are not dependencies
    layout.resolved.write_text("   g:a:jar:1:compile -- module g.a\n   g:b:jar:3:compile\n")
    with pytest.raises(ServiceError, match=r"added \['g:b:jar:3:compile'\], removed \[\]"):
        check_lock(layout)
    layout.lock.unlink()
    with pytest.raises(ServiceError, match=r"dependencies\.lock is missing"):
        check_lock(layout)


def _fake_java(tmp_path: Path, version_line: str) -> Path:
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return home


@pytest.mark.parametrize(("line", "major"), [('openjdk version "1.8.0_392"', 8),
                                             ('openjdk version "11.0.21" 2023-10-17', 11)])
def test_an_old_java_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            line: str, major: int) -> None:
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, line)))
    with pytest.raises(SearchNodeUnavailable, match=rf"^Java 17\+ is needed, .* is Java {major}$"):
        java_binary()


def test_a_missing_java_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SearchNodeUnavailable, match=r"^Java 17\+ is not installed"):
        java_binary()


def test_a_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServiceError, match="already in use"):
            start_search_node(tmp_path / "home", port=taken.getsockname()[1])


def _request(method: str, url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)  # type: ignore[no-any-return]


def test_a_document_written_just_before_a_stop_is_there_after_the_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    node = start_search_node(home, data=tmp_path / "data")
    try:
        about = _request("GET", f"{node.url}/")
        version = about["version"]
        assert isinstance(version, dict)
        assert version["distribution"] == "opensearch"
        assert version["lucene_version"]
        # No refresh, no flush: only the node's own close on SIGTERM makes this durable in Lucene.
        _request("PUT", f"{node.url}/durable/_doc/1", {"subject": "kept"})
    finally:
        node.stop()
    assert node.process.returncode == 143  # the JVM ran its shutdown hook (SIGKILL would be -9)
    assert "closed" in (home / "logs" / "mailsync-embedded.log").read_text()

    again = start_search_node(home, data=tmp_path / "data")
    try:
        assert _request("GET", f"{again.url}/durable/_doc/1")["_source"] == {"subject": "kept"}
        count = _request("GET", f"{again.url}/durable/_count")
        assert count["count"] == 1
    finally:
        again.stop()
