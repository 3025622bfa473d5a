"""Check 3: the Function App's app settings equal what mailsync reads, no more, no less."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from mailsync.settings import Settings
from tests.infra import checks
from tests.infra.conftest import Plant, new_problems
from tests.paths import ROOT

MAIN = "infra/bicep/main.bicep"


def _planted(copy: Path) -> list[str]:
    return new_problems(checks.settings_problems(copy, Settings), checks.settings_problems(ROOT, Settings))


def test_bicep_app_settings_equal_what_the_app_reads() -> None:
    assert checks.settings_problems(ROOT, Settings) == []


class _Recording(Mapping[str, str]):
    """An empty environment that remembers every name asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return default

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_the_source_scan_finds_every_name_from_env_reads() -> None:
    """The parity check reads settings.py with ast; running from_env must not find a name it missed."""
    recording = _Recording()
    Settings.from_env(recording)
    scanned = checks.settings_reads(ROOT / "mailsync" / "settings.py")
    assert recording.asked, "from_env read nothing through the mapping it was given"
    assert recording.asked <= scanned.names, recording.asked - scanned.names


def test_secrets_are_known_by_their_repr_false_fields() -> None:
    scanned = checks.settings_reads(ROOT / "mailsync" / "settings.py")
    assert {"MS_CLIENT_SECRET", "ELASTICSEARCH_API_KEY", "TOKEN_ENCRYPTION_KEYS"} <= scanned.secret_names


def test_catches_a_setting_the_app_reads_but_bicep_does_not_set(project_copy: Path, plant: Plant) -> None:
    plant(
        "mailsync/settings.py",
        'log_format=e.get("LOG_FORMAT") or "json",',
        'log_format=e.get("LOG_FORMAT") or e.get("LOG_STYLE") or "json",',
    )
    problems = _planted(project_copy)
    assert len(problems) == 1 and problems[0].startswith("missing: the app reads LOG_STYLE"), problems


def test_catches_a_dead_setting(project_copy: Path, plant: Plant) -> None:
    plant(MAIN, "  LOG_FORMAT: logFormat\n", "  LOG_FORMAT: logFormat\n  LOG_LEVEL: 'debug'\n")
    problems = _planted(project_copy)
    assert problems == ["dead: the Bicep sets LOG_LEVEL, which neither the app nor the host reads"]


def test_catches_a_dropped_setting(project_copy: Path, plant: Plant) -> None:
    plant(MAIN, "  GRAPH_PAGE_SIZE: string(graphPageSize)\n", "")
    problems = _planted(project_copy)
    assert len(problems) == 1 and problems[0].startswith("missing: the app reads GRAPH_PAGE_SIZE"), problems


def test_catches_a_secret_that_is_not_a_key_vault_reference(project_copy: Path, plant: Plant) -> None:
    plant(
        MAIN,
        "  MS_CLIENT_SECRET: '@Microsoft.KeyVault(VaultName=${vaultName};SecretName=${secretNames.msClientSecret})'\n",
        "  MS_CLIENT_SECRET: msClientSecret\n",
    )
    problems = _planted(project_copy)
    assert len(problems) == 1 and "MS_CLIENT_SECRET is a secret and must be a Key Vault reference" in problems[0], (
        problems
    )


def test_catches_a_default_that_drifted_from_the_code(project_copy: Path, plant: Plant) -> None:
    plant(MAIN, "param graphPageSize int = 500", "param graphPageSize int = 400")
    problems = _planted(project_copy)
    assert len(problems) == 1 and "GRAPH_PAGE_SIZE defaults to '400' in Bicep" in problems[0], problems


def test_catches_a_default_the_app_rejects(project_copy: Path, plant: Plant) -> None:
    plant(MAIN, "param graphMaxConcurrency int = 4", "param graphMaxConcurrency int = 8")
    problems = _planted(project_copy)
    assert len(problems) == 1 and "GRAPH_MAX_CONCURRENCY='8' is rejected by mailsync.settings" in problems[0], problems


def test_catches_a_storage_connection_string(project_copy: Path, plant: Plant) -> None:
    plant(
        "infra/bicep/modules/functionapp.bicep",
        "  AzureWebJobsStorage__accountName: storageAccountName\n",
        "  AzureWebJobsStorage__accountName: storageAccountName\n"
        "  AzureWebJobsStorage: 'DefaultEndpointsProtocol=https;AccountName=x'\n",
    )
    problems = _planted(project_copy)
    assert len(problems) == 1 and problems[0].startswith("AzureWebJobsStorage is set in Bicep but must not be"), (
        problems
    )


def test_catches_a_binding_expression_without_a_setting(project_copy: Path) -> None:
    extra = project_copy / "functions" / "health" / "planted.py"
    extra.write_text(
        "import azure.functions as func\n"
        "bp = func.Blueprint()\n"
        '@bp.queue_trigger(arg_name="msg", queue_name="%CLEANUP_QUEUE_NAME%", connection="CleanupStorage")\n'
        "def cleanup(msg): ...\n",
        encoding="utf-8",
    )
    problems = _planted(project_copy)
    assert any(p.startswith("missing: the app reads CLEANUP_QUEUE_NAME") for p in problems), problems
    assert any("connection CleanupStorage" in p for p in problems), problems


def test_only_binding_arguments_count_as_app_setting_expressions(project_copy: Path) -> None:
    (project_copy / "functions" / "health" / "planted.py").write_text(
        "import logging\n"
        "import azure.functions as func\n"
        "bp = func.Blueprint()\n"
        'QUEUE = "%PLANTED_QUEUE%"\n'
        '@bp.queue_trigger(arg_name="msg", queue_name=QUEUE, connection="AzureWebJobsStorage")\n'
        "def planted(msg):\n"
        '    logging.info("rate %d%% of %s%", 5, "x")\n',
        encoding="utf-8",
    )
    problems = _planted(project_copy)
    assert problems == [
        "missing: the app reads PLANTED_QUEUE but the Bicep does not set it "
        "(add it to appSettings in infra/bicep/main.bicep, or to NOT_IN_AZURE in tests/infra/checks.py with a reason)"
    ]
