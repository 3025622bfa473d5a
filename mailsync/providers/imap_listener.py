"""The IMAP change listener: a long-running process that enqueues sync jobs within a second of a change.

Run it where a process may live for hours (Azure Container Apps, a VM,
the devhost's machine)::

    python -m mailsync.providers.imap_listener

It reads the same app settings as the Function App (storage connection,
TOKEN_ENCRYPTION_KEYS, queue name), watches every linked IMAP account and
puts SYNC_FOLDER / SYNC_FOLDERS jobs on the sync queue; the sync worker
does the rest, exactly as after a Graph notification or a STATUS poll.

Why not in a Function: IMAP has no webhooks; a server tells a client
about changes only over a connection the client keeps open (IDLE, RFC
2177; NOTIFY, RFC 5465). Serverless functions run for one trigger and are
frozen or recycled between invocations (Consumption / Flex plans cap an
execution at minutes and scale to zero), so they cannot hold thousands of
sockets open for hours. Without the listener the poll timer's STATUS poll
(mailsync.monitoring.imap_poll) still finds every change, a tick later.

Per account, one connection:

* with NOTIFY (Dovecot, Cyrus): ``NOTIFY SET STATUS (personal (MessageNew
  MessageExpunge FlagChange MailboxName SubscriptionChange))``, then IDLE.
  The server sends ``* STATUS <folder> (...)`` for a change in any folder
  and ``* LIST`` when folders come and go — every folder on one socket.
* without NOTIFY (Gmail, most others): one connection per folder, each
  EXAMINEd and IDLE (``EXISTS``/``EXPUNGE``/``FETCH`` say that folder
  changed), plus a LIST every ``folder_check_s`` for new or gone folders.
  Servers cap connections per user (Dovecot 10 per user and IP, Gmail
  15), so at most ``max_idle`` folders are watched this way — Inbox first,
  then the other role folders, then the rest by name; the STATUS poll
  covers the others.

IDLE is re-issued every ``reidle_s`` (servers drop an IDLE after 30
minutes, RFC 2177); a dropped connection is reopened with back-off.
Events are coalesced for ``coalesce_s`` (0.1 s) so a burst becomes one job
per folder. A job for a folder the engine is already paging only marks it
dirty (the engine's lease protocol), so extra jobs are harmless.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from mailsync.errors import MailsyncError, ProviderAuthError, ReauthRequired
from mailsync.jobs import JobKind, new_job
from mailsync.ports import JobQueue
from mailsync.providers.imap import folders_from_list
from mailsync.providers.imap_session import ImapSession

log = logging.getLogger("mailsync.providers.imap_listener")

NOTIFY_EVENTS = b"(personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))"
_FOLDER_EVENTS = {b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED", b"RECENT"}
LIST_CHANGE = ""   # the key of "the folder list changed" in a change set


class JobSink:
    """Coalesces change events and enqueues one job per (account, folder) per ``coalesce_s``."""

    def __init__(self, queue: JobQueue, *, coalesce_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._queue = queue
        self._coalesce_s = coalesce_s
        self._pending: set[tuple[str, str]] = set()
        self._cond = threading.Condition()
        self._clock = clock
        self.enqueued = 0

    def changed(self, account_id: str, folder_id: str | None) -> None:
        with self._cond:
            self._pending.add((account_id, folder_id if folder_id is not None else LIST_CHANGE))
            self._cond.notify()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                if not self._pending:
                    self._cond.wait(timeout=0.5)
                    continue
            time.sleep(self._coalesce_s)   # let a burst gather
            self.flush()
        self.flush()

    def flush(self) -> None:
        with self._cond:
            batch, self._pending = self._pending, set()
        for account_id, folder_id in sorted(batch):
            if folder_id == LIST_CHANGE:
                job = new_job(JobKind.SYNC_FOLDERS, account_id, reason="imap_listener")
            else:
                job = new_job(JobKind.SYNC_FOLDER, account_id, folder_id, reason="imap_listener")
            try:
                self._queue.enqueue(job)
                self.enqueued += 1
            except MailsyncError as exc:
                log.warning("could not enqueue a listener job: %s", exc.code, extra={"account_id": account_id})


def _name(value: Any) -> str:
    if isinstance(value, bytes):
        from imapclient.imap_utf7 import decode

        return str(decode(value))
    return str(value)


class AccountWatcher:
    """Keeps one account's connection(s) open and reports its changes to the sink."""

    def __init__(self, account_id: str, connect: Callable[[str], ImapSession], sink: JobSink, *,
                 reidle_s: float = 25 * 60, folder_check_s: float = 60.0, use_notify: bool = True,
                 max_idle: int = 8) -> None:
        self.account_id = account_id
        self._connect = connect
        self._sink = sink
        self._reidle_s = reidle_s
        self._folder_check_s = folder_check_s
        self._use_notify = use_notify
        self._max_idle = max_idle
        self.stop_event = threading.Event()
        self.mode = ""          # "notify" or "idle" once connected
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"imap-watch-{account_id[:8]}", daemon=True)
        self._idlers: dict[str, threading.Thread] = {}

    def start(self) -> AccountWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                session = self._connect(self.account_id)
            except (ProviderAuthError, ReauthRequired):
                log.warning("IMAP login refused; the listener leaves this account to the engine",
                            extra={"account_id": self.account_id})
                self._sink.changed(self.account_id, None)   # the engine marks it reauth_required
                return
            except MailsyncError as exc:
                log.info("listener cannot connect (%s); retrying", exc.code, extra={"account_id": self.account_id})
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            try:
                if self._use_notify and session.has("NOTIFY"):
                    self.mode = "notify"
                    self._notify_loop(session)
                else:
                    self.mode = "idle"
                    self._idle_per_folder(session)
                backoff = 1.0
            except MailsyncError as exc:
                log.info("listener connection lost (%s); reconnecting", exc.code,
                         extra={"account_id": self.account_id})
                # Changes during the gap are not lost: the next round reads from the cursors.
                self._sink.changed(self.account_id, None)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 60.0)
            finally:
                session.close()

    # --- NOTIFY: one connection, every folder -------------------------------------------------------

    def _notify_loop(self, session: ImapSession) -> None:
        # Flag changes in folders we have not selected arrive as STATUS (HIGHESTMODSEQ ...) only once
        # CONDSTORE is on (RFC 5465 5.2); without it Dovecot reports new mail and expunges alone.
        session.enable("CONDSTORE")
        session.raw_command(b"NOTIFY", [b"SET", NOTIFY_EVENTS])
        # From here on no change is missed: the server reports it, in IDLE or before the next one.
        log.info("listener watching the account (NOTIFY)", extra={"account_id": self.account_id})
        while not self.stop_event.is_set():
            session.idle_start()
            self.ready.set()
            until = time.monotonic() + self._reidle_s
            try:
                while not self.stop_event.is_set() and time.monotonic() < until:
                    for event in session.idle_wait(0.5):
                        self._notify_event(event)
            finally:
                session.idle_done()

    def _notify_event(self, event: Any) -> None:
        if not isinstance(event, tuple) or not event:
            return
        kind = event[0]
        if kind == b"STATUS" and len(event) >= 2:
            self._sink.changed(self.account_id, _name(event[1]))
        elif kind == b"LIST":
            self._sink.changed(self.account_id, None)

    # --- no NOTIFY: one IDLE per folder ------------------------------------------------------------------

    def _idle_per_folder(self, session: ImapSession) -> None:
        known: set[str] = set()
        while not self.stop_event.is_set():
            listed = folders_from_list(self.account_id, session.list_mailboxes(()))
            folders = {f.folder_id for f in listed}
            if known and folders != known:
                self._sink.changed(self.account_id, None)
            ranked = sorted(listed, key=lambda f: (f.role != "inbox", f.role is None, f.folder_id))
            watched = [f.folder_id for f in ranked][: self._max_idle]
            for folder in [f for f in watched if f not in self._idlers]:
                thread = threading.Thread(target=self._idle_folder, args=(folder,), daemon=True,
                                          name=f"imap-idle-{folder[:16]}")
                self._idlers[folder] = thread
                thread.start()
            known = folders
            if not self.ready.is_set():
                log.info("listener watching the account (IDLE, %d folders)", len(watched),
                         extra={"account_id": self.account_id})
            self.ready.set()
            self.stop_event.wait(self._folder_check_s)

    def _idle_folder(self, folder: str) -> None:
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                session = self._connect(self.account_id)
            except MailsyncError:
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            try:
                session.examine(folder)
                while not self.stop_event.is_set():
                    session.idle_start()
                    until = time.monotonic() + self._reidle_s
                    try:
                        while not self.stop_event.is_set() and time.monotonic() < until:
                            events = session.idle_wait(0.5)
                            if any(isinstance(e, tuple) and len(e) > 1 and e[1] in _FOLDER_EVENTS for e in events):
                                self._sink.changed(self.account_id, folder)
                    finally:
                        session.idle_done()
                backoff = 1.0
            except MailsyncError as exc:
                if exc.code == "not_found":
                    self._idlers.pop(folder, None)
                    return   # the folder is gone; the folder check reports it
                self._sink.changed(self.account_id, folder)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 60.0)
            finally:
                session.close()


class ImapListener:
    """Watches every linked IMAP account; picks up newly linked and unlinked accounts every ``refresh_s``."""

    def __init__(self, accounts: Callable[[], Iterable[str]], connect: Callable[[str], ImapSession],
                 queue: JobQueue, *, refresh_s: float = 30.0, use_notify: bool = True) -> None:
        self._accounts = accounts
        self._connect = connect
        self.sink = JobSink(queue)
        self._refresh_s = refresh_s
        self._use_notify = use_notify
        self.watchers: dict[str, AccountWatcher] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        sink = threading.Thread(target=self.sink.run, args=(self.stop_event,), name="imap-sink", daemon=True)
        sink.start()
        try:
            while not self.stop_event.is_set():
                self.refresh()
                self.stop_event.wait(self._refresh_s)
        finally:
            # Also on Ctrl-C (an exception here): the sink flushes what it holds once stopped.
            self.stop_event.set()
            for watcher in self.watchers.values():
                watcher.stop()
            sink.join(timeout=5)

    def refresh(self) -> None:
        try:
            wanted = set(self._accounts())
        except MailsyncError as exc:
            log.warning("could not list IMAP accounts: %s", exc.code)
            return
        for account_id in wanted - set(self.watchers):
            self.watchers[account_id] = AccountWatcher(account_id, self._connect, self.sink,
                                                       use_notify=self._use_notify).start()
        for account_id in set(self.watchers) - wanted:
            self.watchers.pop(account_id).stop()

    def stop(self) -> None:
        self.stop_event.set()


def main(argv: list[str] | None = None) -> None:   # pragma: no cover - wiring, exercised by hand and docs
    """Compose the listener from app settings (the same as the Function App's) and run until Ctrl-C."""
    from mailsync.linking.imap import SealedCredentials
    from mailsync.logs import configure_logging
    from mailsync.models import AccountStatus, Provider
    from mailsync.providers.imap import ImapProviderFactory
    from mailsync.security.crypto import load_cipher
    from mailsync.settings import Settings
    from mailsync.storage.accounts import TableAccountRepository
    from mailsync.storage.connection import table_client
    from mailsync.storage.job_queue import AzureJobQueue
    from mailsync.storage.tokens import TableTokenStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh-s", type=float, default=30.0, help="how often to look for (un)linked accounts")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    table = table_client(settings, "accounts")
    tokens = TableTokenStore(table, load_cipher(settings))
    accounts = TableAccountRepository(table, tokens)
    factory = ImapProviderFactory(settings, SealedCredentials(tokens))

    def imap_accounts() -> list[str]:
        return [a.account_id for a in accounts.iter_accounts()
                if a.provider == Provider.IMAP and a.status in (AccountStatus.SYNCING, AccountStatus.SYNCED)]

    listener = ImapListener(imap_accounts, factory.connect, AzureJobQueue(settings), refresh_s=args.refresh_s)
    # A platform stops its processes with SIGTERM, a person with Ctrl-C (SIGINT): both only set the
    # stop event, so changes already noticed are enqueued rather than left to the next STATUS poll.
    # Not Python's default KeyboardInterrupt for SIGINT: raised wherever the main thread happens to
    # be (inside a table call of the account refresh), it left the process running past a 15 s wait
    # (tests/monitoring/test_imap_listener_process.py, once in a fresh-clone run), while SIGTERM's
    # handler never did.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: listener.stop())
    log.info("IMAP listener started")
    with contextlib.suppress(KeyboardInterrupt):   # a Ctrl-C before the handlers: run() stops all on its way out
        listener.run()
    log.info("IMAP listener stopped")


if __name__ == "__main__":   # pragma: no cover
    main()
