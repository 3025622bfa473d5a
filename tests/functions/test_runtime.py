"""The composition root (functions/_shared/runtime.py): what building a service costs the first request."""

from __future__ import annotations

from pathlib import Path

from functions._shared.runtime import Runtime
from mailsync.monitoring.resource_data import DEV_CERTIFICATE_FILE
from mailsync.settings import Settings


def test_linking_builds_no_subscription_manager_until_an_unlink_needs_it(storage_env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    """The subscription manager loads the notification certificates, and in sandbox mode first makes an
    RSA key (0.1-0.5 s of CPU): POST /api/accounts paid that before a new account's first job, though
    only an unlink uses the manager."""
    settings = Settings.from_env({**storage_env, "GRAPH_SANDBOX_URL": "http://127.0.0.1:9",
                                  "MAILSYNC_LOCAL_DIR": str(tmp_path)})
    runtime = Runtime(settings)
    assert runtime.linking is not None
    assert "subscription_manager" not in vars(runtime) and "notification_keys" not in vars(runtime)
    assert not (tmp_path / DEV_CERTIFICATE_FILE).exists()
    # What an unlink calls: the manager, made then (and its certificate with it).
    registry = runtime.linking._subscriptions
    assert registry is not None and registry() is runtime.subscription_manager
    assert (tmp_path / DEV_CERTIFICATE_FILE).exists()
