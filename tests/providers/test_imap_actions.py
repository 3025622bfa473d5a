"""ImapActions against a real Dovecot: the actions contract (with MOVE and without), plus IMAP's own."""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from mailsync.actions.models import MessageAction
from mailsync.providers.imap import message_id_of
from mailsync.providers.imap_actions import ImapActions, walk_structure
from mailsync.providers.imap_session import ImapSession
from tests.fixtures.dovecot import DovecotServer
from tests.providers.actions_contract import ActionsContract, RichMessage
from tests.providers.imap_harness import ImapHarness, make_harness

ATTACHMENT = b"%PDF-1.4 not much of a pdf\n" * 40


@pytest.fixture
def harness(dovecot: DovecotServer) -> ImapHarness:
    return make_harness(dovecot, folders={"INBOX": 50, "Archive": 5, "Trash": 0})


@pytest.fixture
def actions(harness: ImapHarness) -> Iterator[ImapActions]:
    made = ImapActions(harness.connect, harness.account_id)
    yield made
    made.close()


def append_rich(harness: ImapHarness, subject: str = "Quarterly report") -> RichMessage:
    mail = EmailMessage()
    mail["Subject"], mail["From"], mail["To"] = subject, "Carol <carol@example.org>", "me@example.org"
    mail["Reply-To"] = "Reports <reports@example.org>"
    mail.set_content("The plain alternative.")
    mail.add_alternative("<html><body><p>Numbers are <b>up</b> this quarter.</p>"
                         "<img src=\"https://tracker.example/pixel.gif\"></body></html>", subtype="html")
    mail.add_attachment(ATTACHMENT, maintype="application", subtype="pdf", filename="report.pdf")
    with harness.client() as client:
        client.append("INBOX", mail.as_bytes())
        info = client.select_folder("INBOX", readonly=True)
        uid = max(client.search(["SUBJECT", subject]))
    return RichMessage(folder_id="INBOX", message_id=message_id_of("INBOX", int(info[b"UIDVALIDITY"]), uid),
                       subject=subject, attachment_names=frozenset({"report.pdf"}),
                       body_snippet="Numbers are <b>up</b>")


@pytest.fixture
def rich(harness: ImapHarness) -> RichMessage:
    return append_rich(harness)


class TestImapActionsContract(ActionsContract):
    """The shared actions contract on Dovecot (MOVE, UIDPLUS, SPECIAL-USE)."""


class TestImapActionsContractWithoutMove(ActionsContract):
    """A Dovecot without MOVE, CONDSTORE or SPECIAL-USE: COPY + \\Deleted + UID EXPUNGE, trash found by name."""

    @pytest.fixture
    def harness(self, dovecot_plain: DovecotServer) -> ImapHarness:
        return make_harness(dovecot_plain, folders={"INBOX": 50, "Archive": 5, "Trash": 0})


def test_marking_many_read_is_one_store(harness: ImapHarness) -> None:
    sent: list[bytes] = []

    def spied() -> ImapSession:
        session = harness.connect()
        original = session.client._imap.send

        def spy(data: bytes) -> None:
            sent.append(data)
            original(data)

        session.client._imap.send = spy
        return session

    actions = ImapActions(spied, harness.account_id)
    inbox = [m for m in harness.messages().values() if m.folder_id == "INBOX"]
    try:
        outcomes = actions.apply([MessageAction(m.message_id, "INBOX", is_read=True) for m in inbox])
    finally:
        actions.close()
    assert all(o.done for o in outcomes)
    stores = [line for line in sent if b" STORE " in line.upper()]
    assert len(stores) == 1, stores
    assert all(m.is_read for m in harness.messages().values() if m.folder_id == "INBOX")


def test_an_id_acts_in_the_folder_it_names_and_a_stale_or_unknown_one_is_not_found(harness: ImapHarness,
                                                                                  actions: ImapActions) -> None:
    message = next(m for m in harness.messages().values() if m.folder_id == "INBOX")
    # The store's row may name another folder than the id (a move's optimistic row, before its job ran):
    # the id's folder key says where the message is.
    (outcome,) = actions.apply([MessageAction(message.message_id, "Archive", is_read=not message.is_read)])
    assert outcome.done
    assert harness.messages()[message.message_id].is_read is (not message.is_read)
    key, validity, uid = message.message_id.split(".")
    (outcome,) = actions.apply([MessageAction(f"{key}.{int(validity) + 1}.{uid}", "INBOX", is_read=True)])
    assert not outcome.done
    (outcome,) = actions.apply([MessageAction(f"0000000000.{validity}.{uid}", "INBOX", is_read=True)])
    assert not outcome.done


def test_structure_parts_are_numbered_as_body_sections(harness: ImapHarness, actions: ImapActions) -> None:
    rich = append_rich(harness)
    session = harness.connect()
    session.examine("INBOX")
    uid = int(rich.message_id.rsplit(".", 1)[1])
    structure = session.uid_fetch(str(uid), "UID BODYSTRUCTURE")[uid][b"BODYSTRUCTURE"]
    session.close()
    parts = {p.number: (p.content_type, p.is_attachment) for p in walk_structure(structure)}
    assert parts == {"1.1": ("text/plain", False), "1.2": ("text/html", False), "2": ("application/pdf", True)}
    content = actions.read_message("INBOX", rich.message_id)
    assert [a.address for a in content.reply_to] == ["reports@example.org"]
    data = actions.read_attachment("INBOX", rich.message_id, "2", max_bytes=1 << 20)
    assert data.content == ATTACHMENT
