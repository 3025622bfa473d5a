"""Secrets at rest and bearer secrets: the only place mailsync does cryptography.

``crypto`` seals token caches (and IMAP passwords) with AES-GCM under a
rotating key set; ``secrets`` makes and checks the random bearer secrets the
page uses, storing only their SHA-256.
"""
