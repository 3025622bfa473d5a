"""Linking mailboxes to local accounts: the service, the per-provider linkers, access checks."""
