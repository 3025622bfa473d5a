"""A faithful local Microsoft Graph (mail) and Microsoft identity platform.

Run it with ``python -m graph_sandbox --port 7081`` or in-process::

    from graph_sandbox import SandboxConfig, SandboxServer
    with SandboxServer(SandboxConfig(users=2, messages_per_user=50)) as server:
        ...  # HTTP against server.base_url

See docs/graph-sandbox.md.
"""

from graph_sandbox.config import SandboxConfig
from graph_sandbox.server import SandboxServer, create_app

__all__ = ["SandboxConfig", "SandboxServer", "create_app"]
