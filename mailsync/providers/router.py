"""``ProviderRouter``: one ``ProviderFactory`` for the engine that opens each account with its provider's factory.

The engine is given one factory; accounts say which provider they use
(``Account.provider``). Adding a provider is one more entry in the map the
composition root builds (functions/_shared/runtime.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from mailsync.errors import ReauthRequired
from mailsync.models import Account, Provider
from mailsync.ports import MailProvider, ProviderFactory


class ProviderRouter:
    """``ProviderFactory`` that dispatches on ``account.provider``."""

    def __init__(self, factories: Mapping[Provider, ProviderFactory]) -> None:
        self._factories = dict(factories)

    def open(self, account: Account) -> MailProvider:
        factory = self._factories.get(account.provider)
        if factory is None:
            # Nothing here can sync it; the account stops until someone links it where it can.
            raise ReauthRequired(f"no {account.provider.value!r} provider is configured in this deployment")
        return factory.open(account)
