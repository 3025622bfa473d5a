"""Check 2: resource types, api versions and properties exist in Microsoft's ARM schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra import checks
from tests.infra.conftest import Plant, new_problems
from tests.paths import ARM_SCHEMAS, ROOT, shared_file


@pytest.fixture(scope="module")
def arm_schemas() -> Path:
    return shared_file(ARM_SCHEMAS)


def test_every_resource_type_version_and_property_is_in_the_schemas(arm_schemas: Path) -> None:
    assert checks.schema_problems(ROOT, arm_schemas) == []


def test_the_check_sees_every_resource(arm_schemas: Path) -> None:
    """Not vacuous: each declared resource resolves to a schema with properties to compare against."""
    project = checks.load_project(ROOT)
    index = checks.SchemaIndex(arm_schemas)
    resources = [r for f in project.files.values() for r in f.resources.values()]
    assert len(resources) >= 25
    for resource in resources:
        schema = index.resource(resource.type, resource.api_version)
        assert schema is not None, resource.where()
        assert any("properties" in v.node for v in index.resolve(schema)), resource.where()


def _problems(root: Path, arm_schemas: Path) -> list[str]:
    return new_problems(checks.schema_problems(root, arm_schemas), checks.schema_problems(ROOT, arm_schemas))


def test_catches_an_api_version_missing_from_the_schemas(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/signalr.bicep", "signalR@2024-03-01", "signalR@2024-03-02")
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1 and "not in the ARM schemas" in problems[0], problems
    assert "2022-02-01, 2023-02-01, 2024-03-01" in problems[0]


def test_catches_a_resource_type_that_does_not_exist(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant(
        "infra/bicep/modules/storage.bicep",
        "storageAccounts/tableServices/tables@",
        "storageAccounts/tableServices/table@",
    )
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1 and "type unknown to the schemas" in problems[0], problems


def test_catches_a_misspelt_property(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/storage.bicep", "allowSharedKeyAccess: false", "allowSharedKeyAcess: false")
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1 and "'properties.allowSharedKeyAcess' is not a property" in problems[0], problems


def test_catches_a_misspelt_property_deep_in_function_app_config(
    project_copy: Path, plant: Plant, arm_schemas: Path
) -> None:
    plant(
        "infra/bicep/modules/functionapp.bicep",
        "maximumInstanceCount: maximumInstanceCount",
        "maxInstanceCount: maximumInstanceCount",
    )
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1, problems
    assert "'properties.functionAppConfig.scaleAndConcurrency.maxInstanceCount' is not a property" in problems[0]


def test_catches_a_misspelt_top_level_key(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/monitoring.bicep", "  kind: 'web'", "  kinds: 'web'")
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1 and "'kinds' is not a property" in problems[0], problems


def test_catches_a_value_outside_the_enum(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/storage.bicep", "minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_4'")
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1 and "'TLS1_4' is not one of ['TLS1_0', 'TLS1_1', 'TLS1_2', 'TLS1_3']" in problems[0], (
        problems
    )


def test_catches_a_literal_of_the_wrong_type(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/functionapp.bicep", "httpsOnly: true", "httpsOnly: 'yes'")
    problems = _problems(project_copy, arm_schemas)
    assert (
        len(problems) == 1 and "properties.httpsOnly is a string literal, the schema expects boolean" in problems[0]
    ), problems


def test_checks_array_items_and_child_resources(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/signalr.bicep", "flag: 'ServiceMode'", "flags: 'ServiceMode'")
    plant(
        "infra/bicep/modules/keyvault.bicep", "contentType: 'Entra ID app registration client secret'", "content: 'x'"
    )
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 3, problems
    assert any("'properties.features[].flags' is not a property" in p for p in problems)
    assert any("properties.features[] lacks required property 'flag'" in p for p in problems)
    assert any("vaults/secrets" in p and "'properties.content' is not a property" in p for p in problems)


def test_catches_a_missing_required_property(project_copy: Path, plant: Plant, arm_schemas: Path) -> None:
    plant("infra/bicep/modules/keyvault.bicep", "      family: 'A'\n", "")
    problems = _problems(project_copy, arm_schemas)
    assert len(problems) == 1 and "properties.sku lacks required property 'family'" in problems[0], problems
