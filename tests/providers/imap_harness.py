"""A Dovecot mailbox for provider tests: the truth, read and changed through a second IMAP connection.

``ImapHarness`` implements the contract's ``MailboxHarness``: it seeds a
user's Maildir, opens ``ImapProvider``s on it (optionally through a
``FaultProxy``), and changes the mailbox the way another device would —
STORE flags, MOVE, EXPUNGE, APPEND, CREATE / RENAME / DELETE — over its
own connection. The truth (``folders()``, ``messages()``) is read the same
way, independently of the provider's code (only the id scheme is shared:
it *is* the contract between the two).
"""

from __future__ import annotations

import contextlib
import email.header
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from imapclient import IMAPClient

from mailsync.providers.imap import PATHS, ImapProvider, folder_key, message_id_of
from mailsync.providers.imap_session import ImapEndpoint, ImapSession
from tests.fixtures.dovecot import DovecotServer, ImapUser, loopback_policy, rfc822
from tests.providers.contract import TruthFolder, TruthMessage

SEED_FOLDERS = {"INBOX": 40, "Archive": 10, "Projects": 6, "Projects/2026": 4}
BASE_TIME = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
_VIRTUAL = ("\\noselect", "\\nonexistent", "\\all", "\\flagged", "\\important")


def decode_subject(raw: bytes | None) -> str:
    """RFC 2047 subject as Python's email package decodes it (independent of the provider's decoder)."""
    if not raw:
        return ""
    text = raw.decode("utf-8", "replace")
    return str(email.header.make_header(email.header.decode_header(text))).strip()


def seed_messages(rng: random.Random, folders: dict[str, int], *, start: datetime = BASE_TIME
                  ) -> dict[str, list[tuple[bytes, str, datetime]]]:
    """Deterministic messages per folder with distinct arrival times, some read, some flagged, some UTF-8."""
    seeded: dict[str, list[tuple[bytes, str, datetime]]] = {}
    n = 0
    for folder, count in folders.items():
        items = []
        for i in range(count):
            n += 1
            received = start + timedelta(minutes=7 * n)
            subject = f"{folder} message {i}" if i % 5 else f"Café ünïcode {folder} {i}"
            flags = ("S" if rng.random() < 0.5 else "") + ("F" if rng.random() < 0.2 else "")
            items.append((rfc822(subject, sender=f"Sender {n} <s{n}@example.org>", date=received), flags, received))
        seeded[folder] = items
    return seeded


@dataclass
class ImapHarness:
    """One Dovecot user as a ``MailboxHarness``."""

    server: DovecotServer
    user: ImapUser
    paths: Sequence[str] = PATHS
    port: int | None = None        # a FaultProxy's port, to open providers through it
    account_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    inbox_id: str = "INBOX"
    _renamed: dict[str, str] = field(default_factory=dict)
    _clock: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    # --- the provider ------------------------------------------------------------------------

    def endpoint(self) -> ImapEndpoint:
        return ImapEndpoint(host=self.user.host, port=self.port or self.user.port, security="none",
                            username=self.user.username)

    def connect(self) -> ImapSession:
        return ImapSession.connect(self.endpoint(), lambda _force: self.user.password, timeout_s=10.0,
                                   allow_insecure=True, policy=loopback_policy())

    def open(self, *, page_size: int = 50) -> ImapProvider:
        return ImapProvider(self.connect, self.account_id, page_size=page_size, paths=self.paths)

    # --- the other device -----------------------------------------------------------------------

    @contextlib.contextmanager
    def client(self) -> Iterator[IMAPClient]:
        client = self.user.connect()
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def _current(self, folder_id: str) -> str:
        while folder_id in self._renamed:
            folder_id = self._renamed[folder_id]
        return folder_id

    def _locate(self, client: IMAPClient, message_id: str) -> tuple[str, int]:
        """(folder, uid) of a message id, selecting its folder."""
        key, _validity, uid = message_id.split(".")
        for folder in self.folders():
            if folder_key(folder) == key:
                client.select_folder(folder)
                return folder, int(uid)
        raise KeyError(message_id)

    def folders(self) -> dict[str, TruthFolder]:
        with self.client() as client:
            listed = client.list_folders()
        names = {name for flags, _d, name in listed if not {f.decode().lower() for f in flags} & set(_VIRTUAL)}
        found: dict[str, TruthFolder] = {}
        for _flags, delimiter, name in listed:
            if name not in names:
                continue
            sep = delimiter.decode() if delimiter else None
            parent = name.rsplit(sep, 1)[0] if sep and sep in name else None
            found[name] = TruthFolder(name, name.rsplit(sep, 1)[-1] if sep else name,
                                      parent if parent in names else None)
        return found

    def messages(self) -> dict[str, TruthMessage]:
        found: dict[str, TruthMessage] = {}
        with self.client() as client:
            for folder in self.folders():
                info = client.select_folder(folder, readonly=True)
                uids = client.search("ALL")
                if not uids:
                    continue
                validity = int(info[b"UIDVALIDITY"])
                for uid, item in client.fetch(uids, ["FLAGS", "INTERNALDATE", "ENVELOPE"]).items():
                    envelope = item[b"ENVELOPE"]
                    sender = envelope.from_[0] if envelope.from_ else None
                    address = ""
                    if sender is not None and sender.mailbox:
                        address = f"{sender.mailbox.decode()}@{(sender.host or b'').decode()}"
                    mid = message_id_of(folder, validity, uid)
                    found[mid] = TruthMessage(
                        message_id=mid, folder_id=folder, subject=decode_subject(envelope.subject),
                        is_read=b"\\Seen" in item[b"FLAGS"], flagged=b"\\Flagged" in item[b"FLAGS"],
                        sender=address, received_at=item[b"INTERNALDATE"].astimezone(UTC))
        return found

    def set_read(self, message_id: str, read: bool) -> None:
        self._store(message_id, b"\\Seen", read)

    def set_flagged(self, message_id: str, flagged: bool) -> None:
        self._store(message_id, b"\\Flagged", flagged)

    def _store(self, message_id: str, flag: bytes, on: bool) -> None:
        with self.client() as client:
            _folder, uid = self._locate(client, message_id)
            (client.add_flags if on else client.remove_flags)([uid], [flag])

    def move(self, message_id: str, folder_id: str) -> None:
        with self.client() as client:
            _folder, uid = self._locate(client, message_id)
            move(client, [uid], self._current(folder_id))

    def delete(self, message_id: str, *, permanently: bool = False) -> None:
        with self.client() as client:
            folder, uid = self._locate(client, message_id)
            if permanently or folder == "Trash":
                client.add_flags([uid], [b"\\Deleted"])
                client.uid_expunge([uid])
            else:
                move(client, [uid], "Trash")

    def deliver(self, subject: str) -> None:
        # Each delivery arrives later than everything before it (the first screen sorts by arrival).
        self._clock += timedelta(seconds=1)
        when = max(self._clock, datetime.now(UTC).replace(microsecond=0))
        self._clock = when
        with self.client() as client:
            client.append("INBOX", rfc822(subject, date=when), msg_time=when)

    def create_folder(self, name: str) -> str:
        with self.client() as client:
            client.create_folder(name)
        return name

    def rename_folder(self, folder_id: str, name: str) -> None:
        with self.client() as client:
            client.rename_folder(self._current(folder_id), name)
        self._renamed[self._current(folder_id)] = name

    def delete_folder(self, folder_id: str) -> None:
        with self.client() as client:
            client.delete_folder(self._current(folder_id))

    def break_cursors(self) -> None:
        for n, folder in enumerate(sorted(self.folders())):
            self.server.set_uidvalidity(self.user, folder, 1_000_000 + n + random.randrange(1_000_000))


def move(client: IMAPClient, uids: list[int], target: str) -> None:
    """MOVE, or what clients do on servers without it: COPY, \\Deleted, UID EXPUNGE."""
    if client.has_capability("MOVE"):
        client.move(uids, target)
        return
    client.copy(uids, target)
    client.add_flags(uids, [b"\\Deleted"])
    client.uid_expunge(uids)


def make_harness(server: DovecotServer, *, paths: Sequence[str] = PATHS, seed: int = 7,
                 folders: dict[str, int] | None = None) -> ImapHarness:
    user = server.add_user()
    user.seed_maildir(seed_messages(random.Random(seed), folders or SEED_FOLDERS))
    return ImapHarness(server, user, paths=paths)
