"""Azure Storage adapters: tables (accounts, tokens, sync state, subscriptions) and the job queue.

The only package that imports ``azure.data.tables`` / ``azure.storage.queue``
(and ``azure.identity``); clients are built by ``mailsync.storage.connection``.
"""
