"""Architecture rules, checked on the source (every import statement, wherever it sits).

1. The core (``mailsync/``) is framework-free: it never imports azure.functions,
   nor the app layers (functions, devhost, the sandbox, tests).
2. Each third-party client library is imported only inside its adapter(s).
   The table below is the whole policy; change it here, deliberately.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("mailsync", "functions", "function_app.py")

#  library               may be imported only in
ADAPTERS: dict[str, tuple[str, ...]] = {
    "msal":                ("mailsync/auth/*",),
    "requests":            ("mailsync/auth/*", "mailsync/providers/graph_transport.py",
                            "mailsync/realtime/service_tokens.py", "mailsync/realtime/live_sender.py"),
    "elasticsearch":       ("mailsync/store/engines/elasticsearch.py",),
    "elastic_transport":   ("mailsync/store/engines/elasticsearch.py",),
    "opensearchpy":        ("mailsync/store/engines/opensearch.py",),
    "azure.data.tables":   ("mailsync/storage/*",),
    "azure.storage.queue": ("mailsync/storage/*",),
    "azure.identity":      ("mailsync/storage/*", "mailsync/realtime/service_tokens.py",
                            "mailsync/realtime/live_sender.py"),
    "azure.core":          ("mailsync/storage/*",),
    "imapclient":          ("mailsync/providers/imap*.py",),
    "nh3":                 ("mailsync/actions/sanitise.py",),
    "azure.functions":     ("functions/*", "function_app.py"),
    # The core never reaches up into the layers built on it.
    "functions":           ("functions/*", "function_app.py"),
    "devhost":             (),
    "graph_sandbox":       (),
    "tests":               (),
}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # ``from azure import functions`` names the package through its parent.
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def governing_rule(module: str) -> str | None:
    """The most specific library in ADAPTERS that ``module`` belongs to."""
    matches = [lib for lib in ADAPTERS if module == lib or module.startswith(lib + ".")]
    return max(matches, key=len) if matches else None


def violations(root: Path, scanned: tuple[str, ...] = SCANNED) -> list[str]:
    found: list[str] = []
    for entry in scanned:
        base = root / entry
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for path in files:
            relative = path.relative_to(root).as_posix()
            for lineno, module in imports(path):
                library = governing_rule(module)
                if library is None:
                    continue
                if not any(fnmatch(relative, pattern) for pattern in ADAPTERS[library]):
                    found.append(f"{relative}:{lineno} imports {library} (allowed only in "
                                 f"{', '.join(ADAPTERS[library]) or 'nowhere it is scanned'})")
    return sorted(set(found))


def test_imports_follow_the_adapter_table() -> None:
    assert violations(ROOT) == []


def test_core_is_framework_free() -> None:
    offenders = [v for v in violations(ROOT, ("mailsync",)) if "azure.functions" in v]
    assert offenders == []


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    core = tmp_path / "mailsync"
    (core / "sync").mkdir(parents=True)
    (core / "store").mkdir()
    (core / "sync" / "engine.py").write_text(
        "import requests\nfrom azure import functions\n\ndef f():\n    from elasticsearch import helpers\n")
    (core / "store" / "engines").mkdir()
    (core / "store" / "engines" / "elasticsearch.py").write_text("from elasticsearch import Elasticsearch\n")
    # The store's logic is engine-neutral: neither client outside its own engine module.
    (core / "store" / "search_store.py").write_text("from opensearchpy import OpenSearch\n")
    (core / "store" / "engines" / "opensearch.py").write_text("import elastic_transport\nimport opensearchpy\n")
    found = violations(tmp_path, ("mailsync",))
    assert [v.split(" (")[0] for v in found] == [
        "mailsync/store/engines/opensearch.py:1 imports elastic_transport",
        "mailsync/store/search_store.py:1 imports opensearchpy",
        "mailsync/sync/engine.py:1 imports requests",
        "mailsync/sync/engine.py:2 imports azure.functions",
        "mailsync/sync/engine.py:5 imports elasticsearch",
    ]
