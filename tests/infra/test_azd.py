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


def test_outputs_on_public_base_url_are_routes_the_app_serves() -> None:
    assert checks.output_url_problems(ROOT) == []


def test_catches_a_redirect_uri_no_function_serves(project_copy: Path, plant: Plant) -> None:
    plant("infra/bicep/main.bicep", "'${publicBaseUrl}/api/oauth/callback'", "'${publicBaseUrl}/api/auth/callback'")
    assert new_problems(checks.output_url_problems(project_copy), checks.output_url_problems(ROOT)) == [
        "main.bicep output ENTRA_REDIRECT_URI = PUBLIC_BASE_URL + /api/auth/callback, which no function serves"
    ]


def test_the_static_web_app_gets_every_asset_the_pages_load() -> None:
    assert checks.web_asset_problems(ROOT) == []


def test_catches_a_built_asset_azd_would_not_build(project_copy: Path, plant: Plant) -> None:
    plant("azure.yaml", "run: make -C .. static_web/vendor/signalr.min.js", "run: echo nothing to build")
    problems = new_problems(checks.web_asset_problems(project_copy), checks.web_asset_problems(ROOT))
    assert problems == [
        "static_web/data.html loads vendor/signalr.min.js, which git ignores (it is built), "
        "but azure.yaml's web prepackage hook does not build static_web/vendor/signalr.min.js"
    ]


def test_catches_a_page_loading_a_missing_file(project_copy: Path) -> None:
    page = project_copy / "static_web" / "index.html"
    page.write_text(
        page.read_text(encoding="utf-8").replace('href="app.css"', 'href="styles/app.css"'), encoding="utf-8"
    )
    problems = new_problems(checks.web_asset_problems(project_copy), checks.web_asset_problems(ROOT))
    assert problems == ["static_web/index.html loads styles/app.css, which is not in static_web"]
