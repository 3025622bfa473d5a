"""The action worlds (Outlook on the Graph sandbox, IMAP on Dovecot) for every test of this folder."""

from tests.actions.test_service import imap, outlook  # noqa: F401  (pytest finds fixtures by name here)
