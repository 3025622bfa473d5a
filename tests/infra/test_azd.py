"""azure.yaml and main.parameters.json agree with the templates (what `azd up` relies on)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.infra import checks
from tests.infra.conftest import Plant, new_problems
from tests.paths import ROOT


def _planted(copy: Path) -> list[str]:
    return new_problems(checks.azd_problems(copy), checks.azd_problems(ROOT))


def test_azure_yaml_services_and_parameters_match_the_templates() -> None:
    assert checks.azd_problems(ROOT) == []


def test_catches_a_service_without_its_tagged_resource(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/modules/staticweb.bicep", "'azd-service-name': 'web'", "'azd-service-name': 'frontend'")
    problems = _planted(project_copy)
    assert any("service web needs exactly one Microsoft.Web/staticSites" in p for p in problems), problems
    assert any("tagged azd-service-name=frontend, which azure.yaml does not define" in p for p in problems), problems


def test_catches_a_secret_written_into_the_parameters_file(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/main.parameters.json", '"value": "${MS_CLIENT_SECRET}"', '"value": "hunter2"')
    assert _planted(project_copy) == [
        "main.parameters.json: msClientSecret is @secure(); give it as ${ENV_VAR}, never a value in the repository"
    ]


def test_catches_a_parameter_the_template_does_not_have(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/main.parameters.json", '"elasticsearchUrl"', '"elasticUrl"')
    problems = _planted(project_copy)
    assert "main.parameters.json: elasticUrl is not a parameter of main.bicep" in problems, problems
    assert (
        "main.parameters.json: required parameter elasticsearchUrl is missing (azd would prompt every time)" in problems
    )


def test_host_json_suits_flex_consumption_behind_the_static_web_app() -> None:
    assert checks.host_problems(ROOT) == []


def test_catches_an_old_extension_bundle_and_another_route_prefix(tmp_path: Path) -> None:
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    host["extensionBundle"]["version"] = "[3.*, 4.0.0)"
    host.setdefault("extensions", {}).setdefault("http", {})["routePrefix"] = ""
    (tmp_path / "host.json").write_text(json.dumps(host), encoding="utf-8")
    problems = checks.host_problems(tmp_path)
    assert len(problems) == 2, problems
    assert "Flex Consumption needs extensionBundle" in problems[0]
    assert "routePrefix is ''" in problems[1]
