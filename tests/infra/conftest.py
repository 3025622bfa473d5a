"""Fixtures for the infra checks: a disposable copy of the project to plant mistakes in."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.paths import ROOT

# What the checks read: the templates and azd files, mailsync (settings, storage), the functions.
_COPIED = ("infra", "azure.yaml", ".gitignore", "host.json", "mailsync", "functions", "function_app.py", "static_web")

Plant = Callable[[str, str, str], None]


def new_problems(planted: list[str], baseline: list[str]) -> list[str]:
    """What a planted mistake adds to the problems the real project has (ideally none)."""
    return [p for p in planted if p not in set(baseline)]


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A copy of the files the infra checks read, safe to edit."""
    for rel in _COPIED:
        source = ROOT / rel
        target = tmp_path / rel
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return tmp_path


@pytest.fixture
def plant(project_copy: Path) -> Plant:
    """Replace exactly one occurrence of ``old`` with ``new`` in a copied file."""

    def edit(rel: str, old: str, new: str) -> None:
        path = project_copy / rel
        source = path.read_text(encoding="utf-8")
        assert source.count(old) == 1, f"{old!r} must occur exactly once in {rel} to plant a mistake there"
        path.write_text(source.replace(old, new), encoding="utf-8")

    return edit
