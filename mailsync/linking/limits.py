"""The per-client limits on anonymous linking work (docs/security.md, "Limits").

Anyone may call ``POST /api/accounts``. Three token buckets per client
(``Caller.client``: the IPv4 address or IPv6 /64, mailsync/security/client_ip.py)
bound what one client can make us do:

- **new accounts**: every new local account (two table writes and, for a
  redirect provider, a pending sign-in); spent when the request arrives;
- **IMAP attempts**: every login mailsync tries to a server the caller
  names (new account or re-link), spent before connecting;
- **linked accounts per day**: accounts that actually got linked (an
  initial sync and, for IMAP, a poll every minute from then on): checked
  when an account is created, spent when its link succeeds.

Each refusal is a 429 with ``Retry-After`` and nothing written.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsync.settings import Settings
from mailsync.storage.rate_limits import Rule, TableRateLimiter

DAY_S = 86_400


@dataclass(frozen=True)
class LinkingLimits:
    """The three rules and the shared buckets they are counted in."""

    buckets: TableRateLimiter
    new_accounts: Rule
    imap_attempts: Rule
    linked_per_day: Rule

    @classmethod
    def from_settings(cls, settings: Settings, buckets: TableRateLimiter) -> LinkingLimits:
        return cls(
            buckets=buckets,
            new_accounts=Rule("too_many_accounts", settings.rate_limit_new_accounts,
                              settings.rate_limit_new_accounts_period_s,
                              "Too many accounts were created from your network recently. Try again later."),
            imap_attempts=Rule("too_many_imap_attempts", settings.rate_limit_imap_attempts,
                               settings.rate_limit_imap_attempts_period_s,
                               "Too many IMAP sign-in attempts from your network recently. Try again later."),
            linked_per_day=Rule("daily_link_limit", settings.linked_accounts_per_client_per_day, DAY_S,
                                "Your network has linked as many mailboxes today as mailsync allows. "
                                "Try again tomorrow."),
        )

    def new_account(self, client: str) -> None:
        """A new account is about to be created: spend one, and refuse early if no link could follow."""
        self.buckets.check(self.linked_per_day, client)
        self.buckets.spend(self.new_accounts, client)

    def imap_attempt(self, client: str) -> None:
        """A login to a caller-named server is about to be tried."""
        self.buckets.spend(self.imap_attempts, client)

    def linked(self, client: str) -> None:
        """A new account is about to be linked (committed): spend one of the day's links."""
        self.buckets.spend(self.linked_per_day, client)
