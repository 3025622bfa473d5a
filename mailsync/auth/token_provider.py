"""Access tokens for workers: ``MsalTokenProvider`` (implements ``mailsync.ports.TokenProvider``).

Each call works on the account's own MSAL cache, read from its sealed row::

    read row (cache, etag) ─> MSAL acquire_token_silent ─┬─ cache unchanged ──────────> token
                                                         └─ refreshed: save(etag) ─┬─> token
                                                                                   └─ 412: someone saved first:
                                                                                      re-read, go again
    invalid_grant ─> re-read (a few times, briefly): row changed meanwhile? ─ yes ─> go again with the newer cache
                                                                           └ no ──> account reauth_required,
                                                                                    raise ReauthRequired

Why the loop: two workers can refresh the same account at the same moment.
Only one save wins (ETag); the loser never overwrites the winner's newer
refresh token, it re-reads and uses what the winner stored. If the identity
platform enforces single-use refresh tokens, the loser's refresh itself may
fail with ``invalid_grant`` — but the row has changed under it, so that is
not taken for a revoked grant either. Only ``invalid_grant`` against the
newest stored cache marks the account ``reauth_required``.

A small in-process memo keeps a token until shortly before it expires so a
busy worker does not read the table for every Graph request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from mailsync.auth.msal_app import MsalApp, without_access_tokens
from mailsync.errors import Conflict, MailsyncError, NotFound, ProviderUnavailable, ReauthRequired
from mailsync.models import AccountStatus
from mailsync.ports import AccountRepository
from mailsync.storage.tokens import MSAL, TableTokenStore

log = logging.getLogger("mailsync.tokens")

MEMO_MARGIN_S = 300.0
MAX_ATTEMPTS = 6
REFUSAL_RECHECK_S = (0.2, 0.5, 1.0)
REAUTH_MESSAGE = "Microsoft no longer accepts this account's sign-in (expired or revoked). Link it again."


@dataclass(frozen=True)
class _Memo:
    token: str
    expires_at: float


class MsalTokenProvider:
    """Hands out valid Graph access tokens per account, refreshing and rotating safely."""

    def __init__(self, msal_app: MsalApp, tokens: TableTokenStore, accounts: AccountRepository, *,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self._msal = msal_app
        self._tokens = tokens
        self._accounts = accounts
        self._clock = clock
        self._sleep = sleep
        self._memo: dict[str, _Memo] = {}
        self._memo_lock = threading.Lock()
        self._account_locks: dict[str, threading.Lock] = {}

    def access_token(self, account_id: str, *, force_refresh: bool = False) -> str:
        """A valid access token; ``force_refresh`` after Graph refused the last one."""
        if not force_refresh:
            memo = self._memo_get(account_id)
            if memo is not None:
                return memo
        # Threads of one process take turns per account (one refresh instead of
        # several); other processes are kept honest by the ETags below.
        with self._lock_for(account_id):
            if not force_refresh:
                memo = self._memo_get(account_id)
                if memo is not None:
                    return memo
            else:
                self.forget(account_id)
            return self._acquire(account_id, force_refresh)

    def forget(self, account_id: str) -> None:
        """Drop the memoised token (after unlinking, or a 401)."""
        with self._memo_lock:
            self._memo.pop(account_id, None)

    def _acquire(self, account_id: str, force_refresh: bool) -> str:
        for _ in range(MAX_ATTEMPTS):
            stored = self._tokens.read(account_id, MSAL)
            if stored is None:
                self._mark_reauth_required(account_id, only_if_linked=True)
                raise ReauthRequired("no stored sign-in for this account; link it again")
            try:
                silent = self._msal.silent(stored.plaintext, force_refresh=force_refresh)
            except ReauthRequired:
                if self._changed_meanwhile(account_id, stored.etag):
                    force_refresh = False  # another worker rotated the grant: use its cache
                    continue
                self._drop_access_tokens(account_id, stored.plaintext, stored.etag)
                self._mark_reauth_required(account_id)
                raise
            if silent.cache_state is not None:
                try:
                    self._tokens.write(account_id, silent.cache_state, etag=stored.etag, kind=MSAL)
                except Conflict:
                    # Another worker saved a refreshed cache first. Ours is not
                    # saved (its refresh token would replace a newer one); the
                    # stored cache already holds a token as fresh as ours.
                    force_refresh = False
                    continue
                except NotFound as exc:
                    raise ReauthRequired("the account was unlinked") from exc
            self._memo_put(account_id, silent.access_token, silent.expires_at)
            return silent.access_token
        raise ProviderUnavailable("the account's tokens kept changing while refreshing; try again",
                                  retry_after_s=1.0)

    def _drop_access_tokens(self, account_id: str, cache_state: str, etag: str) -> None:
        """After a refusal, keep no access token in the row: no worker hands out a dead one.

        (The refresh token stays: a re-link replaces the whole cache anyway.)
        """
        with contextlib.suppress(MailsyncError):  # changed or gone meanwhile: the next call looks again
            self._tokens.write(account_id, without_access_tokens(cache_state), etag=etag, kind=MSAL)

    def _changed_meanwhile(self, account_id: str, etag: str) -> bool:
        """Did another worker store a newer cache than the one whose refresh was refused?

        With single-use refresh tokens the other worker's refresh can consume
        ours and its save land a moment after our refusal, so look again a
        few times before calling the grant revoked. (Entra keeps old refresh
        tokens valid, so there the first look decides; a revoked grant is
        rare enough that the short wait costs nothing.)
        """
        for delay in (0.0, *REFUSAL_RECHECK_S):
            if delay:
                self._sleep(delay)
            current = self._tokens.read(account_id, MSAL)
            if current is None:
                return False
            if current.etag != etag:
                return True
        return False

    def _mark_reauth_required(self, account_id: str, *, only_if_linked: bool = False) -> None:
        """Set the account to ``reauth_required`` (visible in the API and the page); jobs stop."""
        self.forget(account_id)
        for _ in range(3):
            try:
                account = self._accounts.get(account_id)
                if account is None or account.status == AccountStatus.REAUTH_REQUIRED:
                    return
                if only_if_linked and account.status not in (AccountStatus.SYNCING, AccountStatus.SYNCED):
                    return
                self._accounts.save(replace(account, status=AccountStatus.REAUTH_REQUIRED, error=REAUTH_MESSAGE,
                                            updated_at=datetime.now(UTC)))
                log.warning("account needs to be linked again", extra={"account_id": account_id})
                return
            except Conflict:
                continue
            except NotFound:
                return
            except MailsyncError:
                # The caller still gets ReauthRequired; the next attempt marks it.
                log.warning("could not mark the account reauth_required", extra={"account_id": account_id})
                return

    def _lock_for(self, account_id: str) -> threading.Lock:
        with self._memo_lock:
            lock = self._account_locks.get(account_id)
            if lock is None:
                if len(self._account_locks) > 10_000:
                    self._account_locks.clear()  # bounded; a dropped lock only costs a duplicate refresh
                lock = self._account_locks[account_id] = threading.Lock()
            return lock

    def _memo_get(self, account_id: str) -> str | None:
        with self._memo_lock:
            memo = self._memo.get(account_id)
        if memo is not None and memo.expires_at - MEMO_MARGIN_S > self._clock():
            return memo.token
        return None

    def _memo_put(self, account_id: str, token: str, expires_at: float) -> None:
        with self._memo_lock:
            self._memo[account_id] = _Memo(token, expires_at)
