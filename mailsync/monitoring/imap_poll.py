"""Change monitoring for IMAP accounts without webhooks: STATUS polling on the poll timer.

IMAP servers cannot call us. Each tick of the poll timer (``POLL_TICK_S``,
a minute) asks every linked IMAP account's server, in one round trip::

    LIST "" "*" RETURN (SPECIAL-USE STATUS (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ))

(LIST-STATUS, RFC 5819; one STATUS per known folder where it is missing)
and compares each folder with where its sync cursor rests
(``mailsync.providers.imap.folder_moved``): a new UIDNEXT is new mail, a
new HIGHESTMODSEQ is a flag change or an expunge, a new UIDVALIDITY a
recreated folder, a new MESSAGES count (servers without CONDSTORE) an
expunge. Only folders that moved get a SYNC_FOLDER job; a folder that
appeared or vanished gets the account a SYNC_FOLDERS job. A quiet account
costs one login and one LIST, and no job, no table write.

Per account and tick: one IMAP session (connect, login, LIST-STATUS,
logout) and, only when the server's answer differs from the one the
account's rows were last found in step with (this process remembers it),
one read of the account's sync rows (one partition query). That read on
every tick was 1,440 table calls a day per quiet IMAP account, 16.7 a
second at 1,000 accounts (docs/scaling.md, "At rest"). Accounts
are polled ``IMAP_POLL_CONCURRENCY`` at a time. docs/imap.md has the
measured cost; the optional listener (``python -m
mailsync.providers.imap_listener``) brings change latency from a tick down
to under a second where a long-running process is possible.

An account whose server refuses the login gets a SYNC_FOLDERS job anyway:
the engine then meets the same refusal and marks it ``reauth_required``
(shown on the page), after which it is no longer polled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from mailsync.errors import MailsyncError, ProviderAuthError, ReauthRequired
from mailsync.jobs import JobKind, new_job
from mailsync.models import Account, AccountStatus, Job, Provider
from mailsync.ports import JobQueue
from mailsync.providers.imap import STATUS_ITEMS, cursor_at_rest, folder_moved, folders_from_list
from mailsync.providers.imap_session import ImapSession, MailboxEntry
from mailsync.storage.sync_rows import AccountSyncState

log = logging.getLogger("mailsync.monitoring.imap_poll")

WATCHED = frozenset({AccountStatus.SYNCING, AccountStatus.SYNCED})


class Accounts(Protocol):
    def iter_accounts(self) -> Iterator[Account]: ...


class SyncRows(Protocol):
    def load(self, account_id: str) -> AccountSyncState: ...


@dataclass(frozen=True)
class AccountPoll:
    """What one account's poll found."""

    account_id: str
    folders: int = 0
    jobs: tuple[Job, ...] = ()
    error: str | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class ImapPollReport:
    accounts: int = 0
    folders: int = 0
    jobs: int = 0
    errors: int = 0
    elapsed_s: float = 0.0


def changed_jobs(account_id: str, rows: AccountSyncState, session: ImapSession, *, reason: str) -> list[Job]:
    """The jobs one look at the server calls for (none when nothing moved)."""
    known = rows.folders
    return jobs_for(account_id, rows, session.list_mailboxes(STATUS_ITEMS, status_for=lambda e: e.name in known),
                    reason=reason)


def jobs_for(account_id: str, rows: AccountSyncState, entries: Sequence[MailboxEntry], *, reason: str) -> list[Job]:
    """The jobs the server's LIST-STATUS answer calls for against the account's rows (none: nothing moved)."""
    known = rows.folders
    current = {f.folder_id for f in folders_from_list(account_id, entries)}
    jobs: list[Job] = []
    if rows.folder_list is not None and current != set(known):
        jobs.append(new_job(JobKind.SYNC_FOLDERS, account_id, reason=reason))
    for entry in entries:
        row = known.get(entry.name)
        if row is not None and entry.name in current and folder_moved(row.cursor, entry):
            jobs.append(new_job(JobKind.SYNC_FOLDER, account_id, entry.name, reason=reason))
    return jobs


@dataclass(frozen=True)
class _InStep:
    """The LIST-STATUS answer an account's rows were last found in step with, and the folders asked about."""

    names: frozenset[str]
    entries: frozenset[MailboxEntry]


class ImapStatusPoller:
    """The poll timer's IMAP half: STATUS every IMAP account, enqueue only what moved."""

    def __init__(self, accounts: Accounts, rows: SyncRows, connect: Callable[[str], ImapSession],
                 queue: JobQueue, *, concurrency: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        self._accounts = accounts
        self._rows = rows
        self._connect = connect
        self._queue = queue
        self._concurrency = max(1, concurrency)
        self._clock = clock
        # Per account, the server's answer when its rows were last found in step with it (every cursor
        # at rest, nothing moved): this process's memory, empty after a restart (its first tick reads).
        self._in_step: dict[str, _InStep] = {}

    def watched(self) -> list[str]:
        return [a.account_id for a in self._accounts.iter_accounts()
                if a.provider == Provider.IMAP and a.status in WATCHED]

    def tick(self, account_ids: Iterable[str] | None = None) -> ImapPollReport:
        started = self._clock()
        ids = list(account_ids) if account_ids is not None else self.watched()
        if not ids:
            return ImapPollReport()
        with ThreadPoolExecutor(max_workers=min(self._concurrency, len(ids)),
                                thread_name_prefix="imap-poll") as pool:
            polls = list(pool.map(self.poll_account, ids))
        report = ImapPollReport(accounts=len(polls), folders=sum(p.folders for p in polls),
                                jobs=sum(len(p.jobs) for p in polls), errors=sum(1 for p in polls if p.error),
                                elapsed_s=round(self._clock() - started, 3))
        log.info("imap poll: %d accounts, %d folders, %d jobs, %d errors in %.3f s", report.accounts,
                 report.folders, report.jobs, report.errors, report.elapsed_s)
        return report

    def poll_account(self, account_id: str) -> AccountPoll:
        started = self._clock()
        try:
            seen = self._in_step.get(account_id)
            session: ImapSession | None = None
            try:
                if seen is not None:
                    # The answer the rows were last found in step with: unchanged, nothing moved since,
                    # and the rows need no read (a quiet account's tick costs no table call).
                    session = self._connect(account_id)
                    entries = session.list_mailboxes(STATUS_ITEMS, status_for=lambda e: e.name in seen.names)
                    if frozenset(entries) == seen.entries:
                        return AccountPoll(account_id, folders=len(seen.names), elapsed_s=self._clock() - started)
                rows = self._rows.load(account_id)
                if rows.folder_list is None or rows.folder_list.rounds == 0:
                    self._in_step.pop(account_id, None)
                    return AccountPoll(account_id)   # the initial sync is still listing folders: nothing to compare
                session = session or self._connect(account_id)
                names = frozenset(rows.folders)
                entries = session.list_mailboxes(STATUS_ITEMS, status_for=lambda e: e.name in names)
                jobs = jobs_for(account_id, rows, entries, reason="imap_poll")
            finally:
                if session is not None:
                    session.close()
            if not jobs and all(cursor_at_rest(row.cursor) for row in rows.folders.values()):
                self._in_step[account_id] = _InStep(names, frozenset(entries))
            else:
                self._in_step.pop(account_id, None)
        except (ProviderAuthError, ReauthRequired) as exc:
            # Let the engine meet the refusal: it marks the account reauth_required for the page.
            job = new_job(JobKind.SYNC_FOLDERS, account_id, reason="imap_poll_auth")
            self._enqueue([job])
            return AccountPoll(account_id, jobs=(job,), error=exc.code, elapsed_s=self._clock() - started)
        except MailsyncError as exc:
            log.info("imap poll failed for an account: %s", exc.code, extra={"account_id": account_id})
            return AccountPoll(account_id, error=exc.code, elapsed_s=self._clock() - started)
        self._enqueue(jobs)
        return AccountPoll(account_id, folders=len(rows.folders), jobs=tuple(jobs),
                           elapsed_s=self._clock() - started)

    def _enqueue(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self._queue.enqueue(job)
