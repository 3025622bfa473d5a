"""The tables the Bicep creates are the ones mailsync's storage code uses."""

from __future__ import annotations

from pathlib import Path

from tests.infra import checks
from tests.infra.conftest import Plant, new_problems
from tests.paths import ROOT

MAIN = "infra/bicep/main.bicep"


def _planted(copy: Path) -> list[str]:
    return new_problems(checks.table_problems(copy), checks.table_problems(ROOT))


def test_bicep_creates_exactly_the_tables_the_code_uses() -> None:
    assert checks.code_tables(ROOT), 'found no table names in mailsync/ (f"{...table_prefix}x" or ``<prefix>x``)'
    assert checks.table_problems(ROOT) == []


def test_catches_a_table_the_bicep_forgot(project_copy: Path, plant: Plant) -> None:
    plant(MAIN, "  'authflows' // pending OAuth flows, keyed by state\n", "")
    assert _planted(project_copy) == ["the code uses table <prefix>authflows but the Bicep does not create it"]


def test_catches_a_table_named_in_code(project_copy: Path) -> None:
    (project_copy / "mailsync" / "planted.py").write_text(
        'def name(settings):\n    return f"{settings.table_prefix}leases"\n', encoding="utf-8"
    )
    assert _planted(project_copy) == ["the code uses table <prefix>leases but the Bicep does not create it"]


def test_catches_a_table_nobody_uses_and_an_invalid_name(project_copy: Path, plant: Plant) -> None:
    plant(MAIN, "  'sync' // per-folder", "  'sync'\n  'old-stuff' // per-folder")
    problems = _planted(project_copy)
    assert "the Bicep creates table <prefix>old-stuff, which the code does not use" in problems, problems
    assert "table name mailsyncold-stuff is not a valid Azure table name" in problems, problems
