"""The page's static files, served the way Azure Static Web Apps serves them in production.

Production hosts ``static_web/`` on Static Web Apps, whose
``staticwebapp.config.json`` sets ``globalHeaders`` on every response (the
Content-Security-Policy, frame and sniffing protection: docs/security.md).
The devhost reads the same file and sends the same headers, so the pages
are developed and tested under the policy they ship with, from one source.
Only ``globalHeaders`` is emulated; the file itself is not served.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger("devhost.static")

CONFIG_NAME = "staticwebapp.config.json"


def global_headers(root: Path) -> dict[str, str]:
    """``globalHeaders`` of ``root/staticwebapp.config.json`` ({} without the file); ValueError if malformed."""
    path = root / CONFIG_NAME
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    headers = config.get("globalHeaders", {}) if isinstance(config, dict) else None
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise ValueError(f"{path}: globalHeaders must be an object of header names to strings")
    return dict(headers)


class StaticSite:
    """GET/HEAD of files under ``root`` (``index.html`` for a folder) with the config's global headers."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.headers = global_headers(self.root)

    def resolve(self, path: str) -> Path | None:
        """The file ``path`` names inside the root, or None (outside, missing, or the config itself)."""
        candidate = (self.root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root):
            return None
        if candidate.is_dir():
            candidate = candidate / "index.html"
        if not candidate.is_file() or candidate == self.root / CONFIG_NAME:
            return None
        return candidate

    def response(self, file: Path) -> web.FileResponse:
        return web.FileResponse(file, headers={**self.headers, "Cache-Control": "no-cache"})
