"""mailsync: keeps a copy of a mailbox in a search store, exactly equal to it.

The framework-free core: settings, errors, models, ports, and the services
and adapters behind them. Nothing here imports ``azure.functions``.
"""
