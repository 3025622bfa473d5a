"""Check 1: the templates parse with tree-sitter-bicep, and their names resolve."""

from __future__ import annotations

from pathlib import Path

from tests.infra import checks
from tests.infra.conftest import Plant, new_problems
from tests.paths import ROOT

MODULES = ("identity", "storage", "functionapp", "signalr", "keyvault", "monitoring", "staticweb", "staticweb-api")


def test_every_template_parses_without_error_or_missing_nodes_and_resolves() -> None:
    assert checks.syntax_problems(ROOT) == []


def test_one_module_per_concern_all_used_by_main() -> None:
    project = checks.load_project(ROOT)
    main = project.files[(ROOT / "infra/bicep/main.bicep").resolve()]
    used = {Path(m.path).stem for m in main.modules.values()}
    assert used == set(MODULES)
    assert {f.path.stem for f in project.files.values()} == set(MODULES) | {"main"}


def test_catches_a_syntax_error(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/modules/signalr.bicep", "    capacity: 1\n  }", "    capacity: 1\n")
    problems = new_problems(checks.syntax_problems(project_copy), checks.syntax_problems(ROOT))
    assert any("signalr.bicep" in p and ("syntax error" in p or "missing" in p) for p in problems), problems


def test_catches_a_misspelt_reference(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/modules/identity.bicep", "  location: location\n", "  location: locaton\n")
    problems = new_problems(checks.syntax_problems(project_copy), checks.syntax_problems(ROOT))
    assert len(problems) == 1 and problems[0].startswith("infra/bicep/modules/identity.bicep:"), problems
    assert problems[0].endswith("'locaton' is not declared")


def test_catches_module_parameters_that_do_not_match(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/main.bicep", "    retentionInDays: logRetentionDays\n", "    retentionDays: logRetentionDays\n")
    problems = new_problems(checks.syntax_problems(project_copy), checks.syntax_problems(ROOT))
    assert any("has no parameter 'retentionDays'" in p for p in problems), problems
    assert any("required parameter 'retentionInDays'" in p for p in problems), problems


def test_catches_a_missing_module_output(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/main.bicep", "signalRHostName: signalR.outputs.hostName", "signalRHostName: signalR.outputs.host"
    )
    problems = new_problems(checks.syntax_problems(project_copy), checks.syntax_problems(ROOT))
    assert any("has no output 'host'" in p for p in problems), problems


def test_loop_variables_are_scoped_to_their_loop(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/main.bicep",
        "    syncQueueName: syncQueueName\n    tableNames:",
        "    syncQueueName: suffix\n    tableNames:",
    )
    problems = new_problems(checks.syntax_problems(project_copy), checks.syntax_problems(ROOT))
    assert any("'suffix' is not declared" in p for p in problems), problems


def test_catches_fetched_keys_and_secrets_in_outputs(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/modules/keyvault.bicep",
        "@description('Vault name, for Key Vault references.')",
        "output leak string = msClientSecret\n\n@description('Vault name, for Key Vault references.')",
    )
    plant(
        "infra/bicep/modules/storage.bicep",
        "@description('Container the Flex Consumption plan deploys from.')",
        "output key string = account.listKeys().keys[0].value\n\n"
        "@description('Container the Flex Consumption plan deploys from.')",
    )
    problems = new_problems(checks.syntax_problems(project_copy), checks.syntax_problems(ROOT))
    assert "infra/bicep/modules/keyvault.bicep: output leak exposes @secure() parameter msClientSecret" in problems
    assert any(p.startswith("infra/bicep/modules/storage.bicep:") and "listKeys() reads keys" in p for p in problems)
    assert len(problems) == 2, problems
