"""A devhost as a child process (``python -m devhost``), for tests, benchmarks and tools.

``start_devhost(env)`` starts one on a free port with exactly ``env`` as app
settings (on top of PATH, HOME and the like; no local.settings.json) and
waits until it serves. Several can share one Azurite: the benchmarks run
extra queue workers this way (``functions=["sync_worker"]``) and kill them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devhost.services.process import ROOT, stop_process, wait_for_ready_file

# What a child process of ours keeps from the parent's environment (the rest are app settings).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "VIRTUAL_ENV", "PYTHONPATH", "SSL_CERT_FILE",
                 "REQUESTS_CA_BUNDLE")


@dataclass
class DevhostProcess:
    """A devhost subprocess: ``base_url``, ``stop()`` (graceful), ``kill()``, ``logs()``."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: in-flight messages are finished or returned. Returns the exit code."""
        stop_process(self.process, grace_s=timeout_s)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash (messages come back when their lease lapses)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


def start_devhost(env: Mapping[str, str], *, app: str = "function_app:app", port: int = 0,
                  functions: list[str] | None = None, script_root: Path = ROOT, static: str = "static_web",
                  extra_args: list[str] | None = None, timeout_s: float = 60.0,
                  log_dir: Path | None = None) -> DevhostProcess:
    """Start ``python -m devhost`` as a subprocess and wait until it serves."""
    workdir = Path(tempfile.mkdtemp(prefix="devhost-", dir=log_dir))
    ready = workdir / "ready.json"
    log_path = workdir / "devhost.log"
    child_env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    child_env.update({"PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json"})
    child_env.update(env)
    args = [sys.executable, "-m", "devhost", "--port", str(port), "--app", app, "--script-root", str(script_root),
            "--local-settings", "", "--static", static, "--ready-file", str(ready)]
    if functions:
        args += ["--functions", ",".join(functions)]
    args += extra_args or []
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, cwd=script_root, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    base_url = str(wait_for_ready_file(ready, process, timeout=timeout_s, name="devhost", log_path=log_path)["url"])
    return DevhostProcess(base_url=base_url, process=process, log_path=log_path, env=dict(env))
