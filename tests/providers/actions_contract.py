"""The actions contract: what every ``MessageActions`` must do, whatever its wire protocol.

A provider's test module subclasses :class:`ActionsContract` and gives three
fixtures: ``harness`` (the provider contract's :class:`MailboxHarness`, the
truth read independently of the code under test), ``actions`` (a
``MessageActions`` on the same mailbox) and ``rich`` (a message with an
HTML body and a file attachment: the sandbox's seed, or one appended to
Dovecot). Every test checks the mailbox itself, not only the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mailsync.actions.models import MessageAction
from mailsync.errors import NotFound, PayloadTooLarge
from mailsync.models import FlagStatus
from mailsync.ports import MessageActions
from tests.providers.contract import MailboxHarness, TruthMessage


@dataclass(frozen=True)
class RichMessage:
    """A message with an HTML body and attachments, and what they must read as."""

    folder_id: str
    message_id: str
    subject: str
    attachment_names: frozenset[str]
    body_snippet: str


def _inbox(harness: MailboxHarness, n: int) -> list[TruthMessage]:
    found = sorted((m for m in harness.messages().values() if m.folder_id == harness.inbox_id),
                   key=lambda m: m.message_id)
    assert len(found) >= n, "the seeded inbox is too small for this test"
    return found[:n]


def _other_folder(harness: MailboxHarness) -> str:
    return sorted(fid for fid in harness.folders() if fid != harness.inbox_id
                  and harness.folders()[fid].name.lower() not in ("trash", "deleted items"))[0]


class ActionsContract:
    """Subclass with ``harness``, ``actions`` and ``rich`` fixtures."""

    def test_mark_read_and_unread(self, harness: MailboxHarness, actions: MessageActions) -> None:
        first, second = _inbox(harness, 2)
        outcomes = actions.apply([MessageAction(first.message_id, first.folder_id, is_read=True),
                                  MessageAction(second.message_id, second.folder_id, is_read=False)])
        assert [o.done for o in outcomes] == [True, True], outcomes
        truth = harness.messages()
        assert truth[first.message_id].is_read is True
        assert truth[second.message_id].is_read is False
        assert outcomes[0].message_id == first.message_id

    def test_flag_and_unflag(self, harness: MailboxHarness, actions: MessageActions) -> None:
        first, second = _inbox(harness, 2)
        outcomes = actions.apply([MessageAction(first.message_id, first.folder_id, flag_status=FlagStatus.FLAGGED),
                                  MessageAction(second.message_id, second.folder_id,
                                                flag_status=FlagStatus.NOT_FLAGGED)])
        assert all(o.done for o in outcomes), outcomes
        truth = harness.messages()
        assert truth[first.message_id].flagged is True
        assert truth[second.message_id].flagged is False

    def test_a_repeated_update_is_done_and_changes_nothing_more(self, harness: MailboxHarness,
                                                                 actions: MessageActions) -> None:
        (message,) = _inbox(harness, 1)
        action = MessageAction(message.message_id, message.folder_id, is_read=True, flag_status=FlagStatus.FLAGGED)
        assert actions.apply([action])[0].done
        before = harness.messages()[message.message_id]
        assert actions.apply([action])[0].done
        assert harness.messages()[message.message_id] == before

    def test_move_lands_in_the_target_and_names_the_moved_message(self, harness: MailboxHarness,
                                                                  actions: MessageActions) -> None:
        (message,) = _inbox(harness, 1)
        target = _other_folder(harness)
        (outcome,) = actions.apply([MessageAction(message.message_id, message.folder_id, is_read=True,
                                                  destination=target)])
        assert outcome.done and outcome.folder_id == target, outcome
        truth = harness.messages()
        assert outcome.message_id in truth
        moved = truth[outcome.message_id]
        assert (moved.folder_id, moved.subject, moved.is_read) == (target, message.subject, True)
        assert not any(m.folder_id == harness.inbox_id and m.subject == message.subject and
                       m.received_at == message.received_at for m in truth.values())

    def test_delete_goes_to_the_trash_and_permanent_delete_removes(self, harness: MailboxHarness,
                                                                   actions: MessageActions) -> None:
        first, second = _inbox(harness, 2)
        before = harness.messages()
        outcomes = actions.apply([MessageAction(first.message_id, first.folder_id, delete=True),
                                  MessageAction(second.message_id, second.folder_id, delete=True, permanent=True)])
        assert all(o.done and o.gone and not o.absent for o in outcomes), outcomes
        truth = harness.messages()
        assert len(truth) == len(before) - 1
        trashed = [m for m in truth.values() if m.subject == first.subject and m.received_at == first.received_at]
        assert len(trashed) == 1 and trashed[0].folder_id != harness.inbox_id
        folder_name = harness.folders()[trashed[0].folder_id].name.lower()
        assert folder_name in ("trash", "deleted items")
        assert not any(m.subject == second.subject and m.received_at == second.received_at for m in truth.values())
        # Deleting again what is gone answers done (a retried delete).
        again = actions.apply([MessageAction(second.message_id, second.folder_id, delete=True, permanent=True)])
        assert again[0].done and again[0].absent, "and says it found none"

    def test_a_retried_delete_to_the_trash_leaves_the_message_in_the_trash(self, harness: MailboxHarness,
                                                                             actions: MessageActions) -> None:
        # An ACTION job redelivered after its delete went through sends the same delete again. A plain
        # Graph DELETE of a message already in Deleted Items deletes it for good, which the user never asked.
        (first,) = _inbox(harness, 1)
        action = MessageAction(first.message_id, first.folder_id, delete=True)
        assert actions.apply([action])[0].done
        again = actions.apply([action])
        assert again[0].done and not again[0].error, again
        trashed = [m for m in harness.messages().values()
                   if m.subject == first.subject and m.received_at == first.received_at]
        assert len(trashed) == 1, "the retried delete must not delete the trashed copy for good"
        assert harness.folders()[trashed[0].folder_id].name.lower() in ("trash", "deleted items")

    def test_an_unknown_message_is_not_found_and_the_rest_still_happens(self, harness: MailboxHarness,
                                                                        actions: MessageActions) -> None:
        (message,) = _inbox(harness, 1)
        bogus = message.message_id[:-1] + ("7" if message.message_id[-1] != "7" else "8") + "9"
        outcomes = actions.apply([MessageAction(bogus, message.folder_id, is_read=True),
                                  MessageAction(message.message_id, message.folder_id, is_read=not message.is_read)])
        assert not outcomes[0].done and isinstance(outcomes[0].error, NotFound)
        assert outcomes[1].done
        assert harness.messages()[message.message_id].is_read is (not message.is_read)

    def test_many_at_once(self, harness: MailboxHarness, actions: MessageActions) -> None:
        messages = sorted(harness.messages().values(), key=lambda m: m.message_id)[:45]
        outcomes = actions.apply([MessageAction(m.message_id, m.folder_id, is_read=True) for m in messages])
        assert all(o.done for o in outcomes), [o for o in outcomes if not o.done][:3]
        truth = harness.messages()
        assert all(truth[m.message_id].is_read for m in messages)

    def test_read_message_whole(self, harness: MailboxHarness, actions: MessageActions, rich: RichMessage) -> None:
        before = harness.messages()[rich.message_id]
        content = actions.read_message(rich.folder_id, rich.message_id)
        assert content.message.subject == rich.subject
        assert content.message.message_id == rich.message_id
        assert content.body_type == "html"
        assert rich.body_snippet in content.body
        assert {a.name for a in content.attachments} >= rich.attachment_names
        assert harness.messages()[rich.message_id].is_read == before.is_read   # reading is not marking read

    def test_read_attachment_bytes_and_bound(self, harness: MailboxHarness, actions: MessageActions,
                                             rich: RichMessage) -> None:
        content = actions.read_message(rich.folder_id, rich.message_id)
        attachment = next(a for a in content.attachments if a.name in rich.attachment_names)
        data = actions.read_attachment(rich.folder_id, rich.message_id, attachment.attachment_id,
                                       max_bytes=1 << 20)
        # IMAP lists the size from BODYSTRUCTURE's encoded octets: an estimate within a few percent.
        assert data.content and abs(len(data.content) - attachment.size) <= 4 + len(data.content) // 50
        with pytest.raises(PayloadTooLarge):
            actions.read_attachment(rich.folder_id, rich.message_id, attachment.attachment_id, max_bytes=8)
        with pytest.raises(NotFound):
            actions.read_attachment(rich.folder_id, rich.message_id, "9.9", max_bytes=1 << 20)

    def test_reading_an_unknown_message_is_not_found(self, harness: MailboxHarness, actions: MessageActions,
                                                     rich: RichMessage) -> None:
        bogus = rich.message_id[:-1] + ("7" if rich.message_id[-1] != "7" else "8") + "9"
        with pytest.raises(NotFound):
            actions.read_message(rich.folder_id, bogus)
