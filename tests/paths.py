"""Well-known paths for tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
GRAPH_CSDL = SHARED / "graph" / "v1.0-Prod.csdl"
ARM_SCHEMAS = SHARED / "azure" / "arm-schemas"
IMAP_BENCH = SHARED / "imap-bench"
ARTIFACTS = ROOT / "test-artifacts"


def shared_file(path: Path) -> Path:
    """Return ``path`` under ../shared, or fail with a clear message."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: tests read Microsoft's schemas from ../shared beside the project root "
            "(see ../shared/README.md)"
        )
    return path
