"""Linking a mailbox to a local account: the use cases behind /api/accounts and the OAuth callback.

The local account (its id) is what every mail document, folder cursor and
subscription hangs off. Linking fills it with a provider identity (address,
display name, provider user id) and a sealed credential, then starts the
initial sync. How the identity is obtained is the provider's business, a
small ``AccountLinker`` plug-in per provider:

- Outlook (``outlook.py``) answers ``begin`` with a redirect to Microsoft's
  sign-in; the identity arrives later, at ``complete``, from the callback.
- A credentials provider (IMAP, next) verifies the login inside ``begin``
  and answers with the identity at once; no callback is involved.

Adding a provider is one module implementing ``AccountLinker`` and one line
in the composition root; nothing here changes.

Account status through linking::

    POST /api/accounts ──> linking ──callback ok──> syncing ──(engine)──> synced
                              │                        ^
                              └─ denied / failed ──> error ──retry (POST with account_id)
    synced/syncing ──(refresh refused)──> reauth_required ──retry──> syncing

A redirect sign-in is bound to the browser that started it
(``browser_binding.py``): ``start`` hands out a nonce for a cookie and the
pending flow keeps its hash; ``complete`` refuses a callback without it.
Anonymous work is limited per client (``limits.py``), and ``clean_up``
(the hourly maintenance timer) deletes accounts that were never linked.

Failure rules: nothing is half-written. The account row and its first
credential are one table transaction; a pending sign-in is single use and
short-lived; each step that fails after the sign-in was consumed sends the
browser back to the return URL with ``error`` / ``error_description`` and
leaves the account retryable.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from mailsync.errors import (
    Conflict,
    DependencyUnavailable,
    InputError,
    MailsyncError,
    NotFound,
    ProviderError,
    RateLimited,
)
from mailsync.jobs import THEN_SYNC, JobKind, JobOutbox, WakingJobQueue, new_job
from mailsync.linking.access import AccountAccess, issue_access_token
from mailsync.linking.browser_binding import BrowserBinding
from mailsync.linking.limits import LinkingLimits
from mailsync.linking.return_urls import ReturnUrlPolicy, with_params
from mailsync.models import Account, AccountStatus, Mailbox, Provider
from mailsync.ports import JobQueue, MessageStore, SubscriptionRegistry, SyncStatusReader
from mailsync.security.client_ip import UNKNOWN_CLIENT
from mailsync.storage.accounts import IdentityClaim, TableAccountRepository, normalize_address
from mailsync.storage.auth_flows import PendingFlow, TableAuthFlowStore
from mailsync.storage.tokens import TableTokenStore

log = logging.getLogger("mailsync.linking")
_T = TypeVar("_T")

FLOW_TTL = timedelta(minutes=10)
_SAVE_ATTEMPTS = 3
COMMON_FIELDS = frozenset({"provider", "return_url", "account_id"})
SYNC_NOT_STARTED = ("temporarily_unavailable", "Linked, but the sync could not be started. Try again in a moment.")


# -- the provider plug-in contract ------------------------------------------------

@dataclass(frozen=True)
class LinkRedirect:
    """``begin``'s answer when the user must sign in at the provider first."""

    authorize_url: str
    state: str
    flow: dict[str, Any] = field(repr=False)  # secret until finished (PKCE verifier)


@dataclass(frozen=True)
class LinkedIdentity:
    """Who the user turned out to be at the provider, and the credential to keep."""

    address: str
    display_name: str
    provider_user_id: str
    credential: str = field(repr=False)      # sealed before it is stored
    credential_kind: str = "msal"
    # A provider job that runs before the initial sync and then starts it (``THEN_SYNC``): Outlook's
    # subscriptions, so that they exist before the first rounds read the mailbox. None: the sync starts now.
    first_job: JobKind | None = None


class AccountLinker(Protocol):
    """One provider's way of establishing a mailbox identity."""

    provider: Provider
    credential_kind: str
    # True when ``begin`` logs in to a server the caller names (IMAP): limited per client.
    verifies_on_begin: bool

    def begin(self, account_id: str, request: Mapping[str, Any], *,
              login_hint: str | None) -> LinkRedirect | LinkedIdentity:
        """Start linking; ``request`` holds the provider-specific fields of the POST body."""
        ...

    def complete(self, flow: Mapping[str, Any], params: Mapping[str, str]) -> LinkedIdentity:
        """Finish a redirect-based sign-in from the callback's query parameters.

        Called while the account is being read (``LinkingService.complete``):
        it must not depend on the local account, only on the pending flow.
        """
        ...


# -- the caller and results ------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    """What the front door knows about who is calling."""

    browser_nonce: str | None = field(default=None, repr=False)  # the sign-in cookie it sent, if any
    client: str = UNKNOWN_CLIENT   # the bucket per-client limits count in (security/client_ip.py)


@dataclass(frozen=True)
class StartResult:
    """What ``POST /api/accounts`` answers. ``access_token`` only when the account is new."""

    account_id: str
    status: AccountStatus
    authorize_url: str | None
    access_token: str | None = field(default=None, repr=False)
    created: bool = True
    # Set when a redirect sign-in started: the front door puts it in the sign-in cookie.
    browser_nonce: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"account_id": self.account_id, "status": self.status.value,
                                "authorize_url": self.authorize_url}
        if self.access_token is not None:
            body["access_token"] = self.access_token
        return body


def account_view(account: Account, sync: dict[str, Any] | None) -> dict[str, Any]:
    """The account as the API shows it (never the token hash)."""
    return {
        "account_id": account.account_id,
        "provider": account.provider.value,
        "address": account.address,
        "display_name": account.display_name,
        "status": account.status.value,
        "error": account.error,
        "created_at": account.created_at.isoformat(),
        "updated_at": account.updated_at.isoformat(),
        "sync": sync,
    }


@dataclass(frozen=True)
class CleanupReport:
    """What one maintenance pass removed or moved."""

    expired_sign_ins: int
    stale_accounts: int
    migrated_claims: int


class _CallbackFailed(Exception):
    """Internal: stop the callback and send the browser back with this error."""

    def __init__(self, code: str, message: str, *, force_error: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.force_error = force_error  # status `error` even for an account that was linked before


# -- the service ------------------------------------------------------------------------

class LinkingService:
    """Creates, links, shows and unlinks local accounts."""

    def __init__(
        self,
        *,
        accounts: TableAccountRepository,
        tokens: TableTokenStore,
        flows: TableAuthFlowStore,
        access: AccountAccess,
        jobs: JobQueue,
        return_urls: ReturnUrlPolicy,
        linkers: Mapping[Provider, AccountLinker],
        store: Callable[[], MessageStore] | None = None,
        sync_status: SyncStatusReader | None = None,
        subscriptions: Callable[[], SubscriptionRegistry] | None = None,
        cleanups: Sequence[Callable[[str], object]] = (),
        limits: LinkingLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._accounts = accounts
        self._tokens = tokens
        self._flows = flows
        self._access = access
        self._jobs = jobs
        self._return_urls = return_urls
        self._linkers = dict(linkers)
        self._store = store
        self._sync_status = sync_status
        self._subscriptions = subscriptions
        self._cleanups = tuple(cleanups)
        # A sign-in's side calls (a row write, or the code's redemption, beside a table call: one wait less
        # for the person), on threads made once rather than a pool per request.
        self._side = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sign-in")
        self._limits = limits
        self._clock = clock

    # -- POST /api/accounts ----------------------------------------------------

    def start(self, body: Mapping[str, Any], bearer: str | None = None, caller: Caller = Caller(), *,
              outbox: JobOutbox | None = None) -> StartResult:
        """Create an account and start linking it, or (with ``account_id`` + bearer) retry linking one.

        A redirect sign-in answers with ``browser_nonce``: the front door must
        set it as the sign-in cookie, or the callback will refuse the sign-in.
        RateLimited (429) when ``caller.client`` has spent its allowance of new
        accounts, IMAP attempts or linked accounts (``limits.py``); nothing is
        written then. ``outbox``: the invocation's queue output binding on the
        sync queue, for the WAKE that starts the initial sync at once
        (:meth:`_jobs_for`).
        """
        jobs = self._jobs_for(outbox)
        provider = self._provider(body.get("provider"))
        linker = self._linkers.get(provider)
        if linker is None:
            raise InputError(f"provider {provider.value!r} is not available here", code="unsupported_provider")
        return_url = self._return_urls.check(body.get("return_url"))
        extra = {k: v for k, v in body.items() if k not in COMMON_FIELDS}
        account_id = body.get("account_id")
        if account_id is not None:
            if not isinstance(account_id, str):
                raise InputError("account_id must be a string")
            new_return_url = return_url if body.get("return_url") else None
            return self._relink(self._access.authenticate(account_id, bearer), linker, extra, new_return_url,
                                caller, jobs)
        if self._limits is not None:
            self._limits.new_account(caller.client)
        return self._create(linker, extra, return_url, caller, jobs)

    def _jobs_for(self, outbox: JobOutbox | None) -> JobQueue:
        """The queue for one call's initial sync job: with the invocation's ``outbox``, a WAKE goes out too.

        The job is sent with the SDK, inside the call (a failure is answered
        here); a message sent so waits for the host's next poll of the queue,
        up to ``maxPollingInterval`` (host.json, 2.5 s) after a quiet spell.
        The WAKE through the function's output binding makes the host poll at
        once (mailsync.jobs.WakingJobQueue), so a new account's first folder
        rounds begin without that wait (bench/imap_initial_sync.py's
        ``first_round_began_s``).
        """
        return self._jobs if outbox is None else WakingJobQueue(self._jobs, outbox)

    def _create(self, linker: AccountLinker, extra: Mapping[str, Any], return_url: str,
                caller: Caller, jobs: JobQueue) -> StartResult:
        account_id = uuid.uuid4().hex
        token, token_hash = issue_access_token(account_id)
        now = self._clock()
        account = Account(account_id=account_id, provider=linker.provider, status=AccountStatus.LINKING,
                          access_token_hash=token_hash, created_at=now, updated_at=now, return_url=return_url)
        # Talk to the provider before writing anything: a provider that is down
        # or refuses the credentials leaves no account behind.
        self._limit_attempt(linker, caller)
        step = linker.begin(account_id, extra, login_hint=None)
        if isinstance(step, LinkedIdentity):
            if self._limits is not None:
                self._limits.linked(caller.client)
            linked = self._commit_new(account, step)
            self._start_sync_or_record(linked, step, jobs, reason="initial")
            return StartResult(account_id, linked.status, None, token)
        nonce = BrowserBinding.issue(caller.browser_nonce)
        saved = self._save_new_with_flow(account, step, return_url, nonce)
        log.info("account created, sign-in started", extra={"account_id": account_id,
                                                             "provider": linker.provider.value})
        return StartResult(account_id, saved.status, step.authorize_url, token, browser_nonce=nonce)

    def _relink(self, account: Account, linker: AccountLinker, extra: Mapping[str, Any],
                new_return_url: str | None, caller: Caller, jobs: JobQueue) -> StartResult:
        if account.provider != linker.provider:
            raise InputError("an account cannot change provider; create a new account", code="provider_mismatch")
        self._limit_attempt(linker, caller)
        step = linker.begin(account.account_id, extra, login_hint=account.address)
        if isinstance(step, LinkedIdentity):
            linked = self._commit_existing(account, step)
            self._start_sync_or_record(linked, step, jobs, reason="relink")
            return StartResult(account.account_id, linked.status, None, created=False)
        updated = account
        if new_return_url or account.status == AccountStatus.ERROR:
            updated = self._accounts.save(replace(
                account, return_url=new_return_url or account.return_url, updated_at=self._clock(),
                status=AccountStatus.LINKING if account.status == AccountStatus.ERROR else account.status))
        nonce = BrowserBinding.issue(caller.browser_nonce)
        self._save_flow(updated, step, updated.return_url or self._return_urls.default_url, nonce)
        log.info("sign-in restarted for account", extra={"account_id": account.account_id})
        return StartResult(account.account_id, updated.status, step.authorize_url, created=False,
                           browser_nonce=nonce)

    def _save_new_with_flow(self, account: Account, step: LinkRedirect, return_url: str,
                            browser_nonce: str) -> Account:
        """Insert the new account and its pending sign-in at once; the account with its ETag.

        Two rows in two tables, neither needing the other's answer: written
        side by side they cost the person one table round trip instead of
        two (onboarding many accounts, each round trip to a busy Tables is
        a good part of ``POST /api/accounts``: docs/scaling.md). Nothing is
        left half-written: a sign-in whose account was not saved is
        discarded (it was never handed out, so no callback can come for it;
        if even the discard fails it expires unused), and an account whose
        sign-in was not saved is removed, as before.
        """
        flow_saved = self._beside(self._save_flow, account, step, return_url, browser_nonce)
        try:
            saved = self._accounts.save(account)
        except MailsyncError:
            if flow_saved.exception() is None:
                self._discard_flow(step.state)
            raise
        try:
            flow_saved.result()
        except MailsyncError:
            self._undo_create(account.account_id)
            raise
        return saved

    def _beside(self, call: Callable[..., _T], *args: Any) -> Future[_T]:
        """``call(*args)`` on a side thread, with this thread's log context."""
        return self._side.submit(contextvars.copy_context().run, call, *args)

    def _discard_flow(self, state: str) -> None:
        try:
            self._flows.discard(state)
        except MailsyncError:
            log.warning("could not remove a sign-in whose account was not saved (it expires unused)")

    def _save_flow(self, account: Account, step: LinkRedirect, return_url: str, browser_nonce: str) -> None:
        now = self._clock()
        self._flows.put(step.state, PendingFlow(account_id=account.account_id, provider=account.provider.value,
                                                flow=step.flow, return_url=return_url, created_at=now,
                                                expires_at=now + FLOW_TTL,
                                                browser_hash=BrowserBinding.digest(browser_nonce)))

    def _undo_create(self, account_id: str) -> None:
        try:
            self._accounts.delete(account_id)
        except MailsyncError:
            # Tables failed twice in a row: the account stays in `linking`
            # with no pending sign-in; the page was told 503 and never got
            # its token, so the row is inert (and retrying creates a new one).
            log.warning("could not remove an account whose sign-in was not saved",
                        extra={"account_id": account_id})

    def _limit_attempt(self, linker: AccountLinker, caller: Caller) -> None:
        if self._limits is not None and linker.verifies_on_begin:
            self._limits.imap_attempt(caller.client)

    # -- the hourly maintenance timer ---------------------------------------------

    def clean_up(self, stale_after: timedelta) -> CleanupReport:
        """Remove what anonymous callers left behind; migrate old identity claims.

        - pending sign-ins past their expiry (abandoned at the provider);
        - accounts that were never linked (``linking``, or ``error`` without
          an address: a cancelled or failed first sign-in) and untouched for
          ``stale_after``. Their sign-in expired long before, so no callback
          can still complete them; the delete is ETag-conditional, so an
          account restarted meanwhile (re-link) stays;
        - address claims IMAP accounts made under older versions
          (storage/accounts.py ``migrate_imap_claims``).
        """
        now = self._clock()
        flows = self._flows.purge_expired(now)
        removed = 0
        for account in self._accounts.iter_accounts((AccountStatus.LINKING, AccountStatus.ERROR)):
            if account.address is not None or now - account.updated_at < stale_after:
                continue
            try:
                self._accounts.delete(account.account_id, etag=account.etag)
            except (Conflict, NotFound):
                continue  # restarted or deleted meanwhile
            removed += 1
            log.info("never-linked account deleted", extra={"account_id": account.account_id})
        migrated = self._accounts.migrate_imap_claims(now=now)
        return CleanupReport(expired_sign_ins=flows, stale_accounts=removed, migrated_claims=migrated)

    # -- GET /api/oauth/callback --------------------------------------------------

    def complete(self, params: Mapping[str, str], caller: Caller = Caller(), *,
                 outbox: JobOutbox | None = None) -> str:
        """Finish a sign-in from the callback's query; return where to redirect the browser.

        InputError for a state that is missing, unknown or already used
        (there is no trustworthy return URL then); SignInElsewhere when the
        caller's browser is not the one that started the sign-in (nothing
        is read from the provider, nothing written, the sign-in stays
        pending for its own browser); DependencyUnavailable when Tables
        cannot be read. Every later failure becomes a redirect with
        ``error`` and ``error_description``. ``outbox``: as for :meth:`start`.
        """
        pending = self._flows.take(params.get("state") or "", caller.browser_nonce)
        base = pending.return_url
        account_id = pending.account_id
        try:
            account, identity = self._account_and_identity(pending, params)
            if account is None:
                raise _CallbackFailed("account_not_found", "This account was deleted before the sign-in finished.")
            try:
                linked = self._finish(account, pending, identity, caller, self._jobs_for(outbox))
            except _CallbackFailed as failure:
                self._record_failure(account, failure.message, force_error=failure.force_error)
                raise
        except _CallbackFailed as failure:
            log.info("sign-in not completed", extra={"account_id": account_id, "error_code": failure.code})
            return with_params(base, {"account_id": account_id, "error": failure.code,
                                      "error_description": failure.message})
        log.info("account linked", extra={"account_id": account_id, "status": linked.status.value})
        return with_params(base, {"account_id": account_id})

    def _account_and_identity(self, pending: PendingFlow, params: Mapping[str, str]
                              ) -> tuple[Account | None, Callable[[], LinkedIdentity] | None]:
        """The account, read while the provider redeems the code; the identity as a call that returns it
        or raises what the provider raised (None: not asked, the sign-in expired or has no linker).

        Independent round trips, one to Tables and one or two to the identity
        platform, side by side: one wait less on the callback a person waits
        for (docs/scaling.md, "Onboarding"). A code redeemed for an account
        deleted meanwhile is simply not used.
        """
        linker = self._linker_for(pending.provider)
        if linker is None or pending.expired(self._clock()):
            return self._accounts.get(pending.account_id), None
        redeemed = self._beside(linker.complete, pending.flow, params)
        try:
            account = self._accounts.get(pending.account_id)
        finally:
            wait([redeemed])   # the provider's answer is in either way
        return account, redeemed.result

    def _linker_for(self, provider: str) -> AccountLinker | None:
        try:
            return self._linkers.get(Provider(provider))
        except ValueError:
            return None

    def _finish(self, account: Account, pending: PendingFlow, identity_of: Callable[[], LinkedIdentity] | None,
                caller: Caller, jobs: JobQueue) -> Account:
        if pending.expired(self._clock()):
            raise _CallbackFailed("login_expired", "The sign-in took too long. Try again.")
        if identity_of is None or pending.provider != account.provider.value:
            raise _CallbackFailed("unsupported_provider", "This provider is not available here.")
        try:
            identity = identity_of()
            if self._limits is not None and account.address is None:
                self._limits.linked(caller.client)   # a new link, not a re-link
            linked = self._commit_existing(account, identity)
        except (ProviderError, DependencyUnavailable, Conflict, NotFound, InputError, RateLimited) as exc:
            raise self._as_failure(exc) from exc
        try:
            self._start_sync(linked, identity, jobs, reason="initial" if account.address is None else "relink")
        except MailsyncError as exc:
            # A sync that could not be queued must not look like one running.
            raise _CallbackFailed(SYNC_NOT_STARTED[0], SYNC_NOT_STARTED[1], force_error=True) from exc
        return linked

    @staticmethod
    def _as_failure(exc: MailsyncError) -> _CallbackFailed:
        if isinstance(exc, Conflict) and exc.code in ("address_in_use", "wrong_mailbox"):
            return _CallbackFailed(exc.code, exc.message)
        if isinstance(exc, NotFound):
            return _CallbackFailed("account_not_found", "This account was deleted before the sign-in finished.")
        if isinstance(exc, DependencyUnavailable):
            return _CallbackFailed("temporarily_unavailable", "A service was unavailable. Try again in a moment.")
        if isinstance(exc, InputError):
            return _CallbackFailed("invalid_request", exc.message)
        if isinstance(exc, ProviderError | RateLimited):
            return _CallbackFailed(exc.code, exc.message)
        return _CallbackFailed("conflict", "The account changed while signing in. Try again.")

    def _record_failure(self, account: Account, message: str, *, force_error: bool = False) -> None:
        """Keep the readable error on the account; a never-linked account goes to ``error``."""
        for _ in range(_SAVE_ATTEMPTS):
            status = account.status
            if force_error or account.address is None or status in (AccountStatus.LINKING, AccountStatus.ERROR):
                status = AccountStatus.ERROR
            try:
                self._accounts.save(replace(account, status=status, error=message, updated_at=self._clock()))
                return
            except Conflict:
                fresh = self._accounts.get(account.account_id)
                if fresh is None:
                    return
                account = fresh
            except MailsyncError:
                log.warning("could not record a sign-in failure on the account",
                            extra={"account_id": account.account_id})
                return

    # -- committing an identity -----------------------------------------------------------

    @staticmethod
    def _check_identity(account: Account, identity: LinkedIdentity) -> None:
        same_user = account.provider_user_id is None or account.provider_user_id == identity.provider_user_id
        same_address = (account.address is None
                        or normalize_address(account.address) == normalize_address(identity.address))
        if not (same_user and same_address):
            raise Conflict(f"You signed in as {identity.address}, but this account is linked to "
                           f"{account.address}. Sign in with that mailbox, or add a new account.",
                           code="wrong_mailbox")

    @staticmethod
    def _identity_claim(account: Account, identity: LinkedIdentity) -> IdentityClaim:
        # Only a provider that verified the address claims it; IMAP claims its login (storage/accounts.py).
        return IdentityClaim.for_identity(account.provider, identity.address, identity.provider_user_id)

    def _claim(self, account: Account, identity: LinkedIdentity) -> None:
        try:
            self._accounts.claim(self._identity_claim(account, identity), account.account_id, now=self._clock())
        except Conflict as exc:
            raise Conflict("This mailbox is already linked to another account.", code="address_in_use") from exc

    def _linked(self, account: Account, identity: LinkedIdentity) -> Account:
        status = AccountStatus.SYNCED if account.status == AccountStatus.SYNCED else AccountStatus.SYNCING
        return replace(account, status=status, address=identity.address, display_name=identity.display_name,
                       provider_user_id=identity.provider_user_id, error=None, updated_at=self._clock())

    def _commit_existing(self, account: Account, identity: LinkedIdentity) -> Account:
        """Claim the identity, then write account + credential in one transaction."""
        self._check_identity(account, identity)
        self._claim(account, identity)
        for attempt in range(_SAVE_ATTEMPTS):
            try:
                return self._accounts.save_with_credential(self._linked(account, identity), identity.credential,
                                                           kind=identity.credential_kind)
            except Conflict:
                # Someone touched the row meanwhile (a status update): re-read and re-apply.
                fresh = self._accounts.get(account.account_id)
                if fresh is None or attempt == _SAVE_ATTEMPTS - 1:
                    self._release_if_new(account, identity)
                    if fresh is None:
                        raise NotFound("the account no longer exists") from None
                    raise
                account = fresh
                self._check_identity(account, identity)
            except MailsyncError:
                self._release_if_new(account, identity)
                raise
        raise AssertionError("unreachable")

    def _commit_new(self, account: Account, identity: LinkedIdentity) -> Account:
        """A credentials provider linked at once: claim, then create account + credential together."""
        self._claim(account, identity)
        try:
            return self._accounts.save_with_credential(self._linked(account, identity), identity.credential,
                                                       kind=identity.credential_kind)
        except MailsyncError:
            self._release_if_new(account, identity)
            raise

    def _release_if_new(self, account: Account, identity: LinkedIdentity) -> None:
        if account.address is not None:
            return  # the identity was already this account's: keep holding it
        try:
            self._accounts.release(self._identity_claim(account, identity), account.account_id)
        except MailsyncError:
            # A claim whose account never got the identity goes stale and is
            # taken over after the grace period (storage/accounts.py).
            log.warning("could not release an identity claim", extra={"account_id": account.account_id})

    def _start_sync(self, account: Account, identity: LinkedIdentity, jobs: JobQueue, *, reason: str) -> None:
        """Show the mailbox, then enqueue the initial sync (or the provider's job that starts it)."""
        if self._store is not None:
            try:
                self._store().upsert_mailbox(Mailbox(account_id=account.account_id, address=identity.address,
                                                   display_name=identity.display_name, provider=account.provider,
                                                   status=account.status))
            except MailsyncError:
                # The engine writes the mailbox document again as it syncs.
                log.warning("could not write the mailbox document yet", extra={"account_id": account.account_id})
        if identity.first_job is None:
            jobs.enqueue(new_job(JobKind.SYNC_FOLDERS, account.account_id, reason=reason))
        else:
            jobs.enqueue(new_job(identity.first_job, account.account_id, reason=reason, attrs={THEN_SYNC: "1"}))

    def _start_sync_or_record(self, account: Account, identity: LinkedIdentity, jobs: JobQueue, *,
                              reason: str) -> None:
        try:
            self._start_sync(account, identity, jobs, reason=reason)
        except MailsyncError:
            self._record_failure(account, SYNC_NOT_STARTED[1], force_error=True)
            raise

    # -- GET /api/accounts/{id} --------------------------------------------------------------

    def get(self, account_id: str, bearer: str | None) -> dict[str, Any]:
        """The account view, with the sync engine's progress summary when it is available."""
        account = self._access.authenticate(account_id, bearer)
        sync: dict[str, Any] | None = None
        if self._sync_status is not None and account.status in (AccountStatus.SYNCING, AccountStatus.SYNCED,
                                                                  AccountStatus.REAUTH_REQUIRED):
            try:
                sync = self._sync_status.summary(account_id)
            except MailsyncError:
                log.warning("sync summary unavailable", extra={"account_id": account_id})
        view = account_view(account, sync)
        if sync is not None and sync.get("store_recreated") and account.status == AccountStatus.SYNCED:
            # The store lost this account's mail and the engine has not noticed yet (it will within
            # a poll tick, and set the account syncing itself): until then, say what is true.
            view["status"] = AccountStatus.SYNCING.value
        return view

    # -- DELETE /api/accounts/{id} -------------------------------------------------------------

    def unlink(self, account_id: str, bearer: str | None) -> None:
        """Delete the account's subscriptions, tokens, documents and rows, in that order.

        Subscriptions go first (deleting one at Graph needs the tokens);
        then the tokens, which stops every worker at its next token
        request; then the documents; the account row last, so a failure
        part-way leaves an account the same bearer can DELETE again.
        """
        account = self._access.authenticate(account_id, bearer)
        if self._subscriptions is not None:
            try:
                self._subscriptions().delete_for_account(account_id)
            except ProviderError:
                # Graph refused (grant revoked): the subscription expires by
                # itself within days, and notifications for an unknown
                # account are dropped by the webhook.
                log.warning("could not delete the account's subscriptions at the provider",
                            extra={"account_id": account_id})
        linker = self._linkers.get(account.provider)
        self._tokens.delete(account_id, linker.credential_kind if linker else "msal")
        if self._store is not None:
            self._store().delete_account(account_id)
        for cleanup in self._cleanups:
            cleanup(account_id)
        self._accounts.delete(account_id)
        log.info("account unlinked", extra={"account_id": account_id})

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _provider(value: object) -> Provider:
        if value is None:
            raise InputError("provider is required (\"outlook\")", code="invalid_provider")
        try:
            return Provider(str(value))
        except ValueError:
            raise InputError(f"unknown provider {value!r}", code="invalid_provider") from None
