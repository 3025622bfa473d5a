"""Change monitoring: Graph subscriptions, webhook notifications, lifecycle events, polling.

The promise: a change the user makes in Outlook reaches the store within
seconds of Graph's notification, and when notifications are late, lost or
impossible (no public URL) the store still converges within a bounded
time. Notifications only ever *trigger* the sync engine's delta sync; they
never carry data into the store. See docs/change-monitoring.md.

Modules: ``subscriptions`` (create / renew / recreate / delete),
``notifications`` (webhook: authenticate + coalesce), ``lifecycle``
(lifecycle webhook), ``handler`` (the NOTIFIED / SYNC_ACCOUNT /
SUBSCRIPTION queue jobs), ``polling`` (the fallback timer), ``graph_api``
(the Graph calls), ``records`` (records and ports).
"""
