"""The sync engine: queue jobs in, provider changes applied to the store, progress out."""
