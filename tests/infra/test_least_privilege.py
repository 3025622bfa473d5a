"""Check 4: one role assignment per data-plane use, to the identity, on the resource it serves."""

from __future__ import annotations

from pathlib import Path

from tests.infra import checks
from tests.infra.conftest import Plant, new_problems
from tests.paths import ROOT

STORAGE = "infra/bicep/modules/storage.bicep"


def test_each_data_plane_use_has_exactly_one_resource_scoped_role() -> None:
    assert checks.role_problems(ROOT) == []


def test_the_uses_cover_every_role_assignment_in_the_templates() -> None:
    project = checks.load_project(ROOT)
    assignments = [
        r
        for f in project.files.values()
        for r in f.resources.values()
        if r.type == "Microsoft.Authorization/roleAssignments"
    ]
    assert len(assignments) == len(checks.USES)


def test_catches_an_assignment_without_scope(project_copy: Path, plant: Plant) -> None:
    plant(STORAGE, "  scope: queueService\n", "")
    problems = new_problems(checks.role_problems(project_copy), checks.role_problems(ROOT))
    assert any("no scope, so it is granted on the whole resource group" in p for p in problems), problems
    assert any(p.startswith("sync queue and its poison queue: expected exactly one") for p in problems), problems


def test_catches_a_broader_scope(project_copy: Path, plant: Plant) -> None:
    plant(STORAGE, "  scope: tableService\n", "  scope: account\n")
    problems = new_problems(checks.role_problems(project_copy), checks.role_problems(ROOT))
    assert any(p.startswith("mailsync tables: expected exactly one role assignment") for p in problems), problems
    assert any(
        "Storage Table Data Contributor on infra/bicep/modules/storage.bicep" in p and "resource account" in p
        for p in problems
    ), problems


def test_catches_the_wrong_role(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/modules/keyvault.bicep",
        "var keyVaultSecretsUserRole = '4633458b-17de-408a-b874-0445c86b69e6'",
        "var keyVaultSecretsUserRole = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'",  # Key Vault Secrets Officer
    )
    problems = new_problems(checks.role_problems(project_copy), checks.role_problems(ROOT))
    assert len(problems) == 1 and "needs Key Vault Secrets User" in problems[0], problems


def test_catches_an_extra_assignment(project_copy: Path, plant: Plant) -> None:
    plant(
        STORAGE,
        "@description('Storage account name (AzureWebJobsStorage__accountName).')",
        """resource everything 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, roles.storageBlobDataOwner)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

@description('Storage account name (AzureWebJobsStorage__accountName).')""",
    )
    problems = new_problems(checks.role_problems(project_copy), checks.role_problems(ROOT))
    assert len(problems) == 1 and "resource everything" in problems[0] and "no data-plane use needs" in problems[0], (
        problems
    )


def test_catches_a_grant_to_someone_else(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/modules/signalr.bicep",
        "    principalId: principalId\n",
        "    principalId: '00000000-0000-0000-0000-000000000000'\n",
    )
    problems = new_problems(checks.role_problems(project_copy), checks.role_problems(ROOT))
    assert len(problems) == 1 and "principalId is not the Function App identity" in problems[0], problems


def test_catches_a_role_on_a_container_the_app_does_not_deploy_from(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/modules/functionapp.bicep",
        "value: '${blobEndpoint}${deploymentContainerName}'",
        "value: '${blobEndpoint}elsewhere'",
    )
    problems = new_problems(checks.role_problems(project_copy), checks.role_problems(ROOT))
    assert "cannot find the container functionAppConfig.deployment.storage deploys from" in problems, problems
