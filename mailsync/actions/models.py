"""Records of the client half: actions on messages, their outcomes, a message read whole.

Provider-neutral like ``mailsync.models``: providers map their wire formats
to these (``mailsync.providers.graph_actions``, ``imap_actions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsync.errors import MailsyncError
from mailsync.models import Address, FlagStatus, Message


@dataclass(frozen=True)
class MessageAction:
    """What to do to one message. Any of the update fields, or a move, or a delete.

    ``folder_id`` is the folder the message is in as the store has it: IMAP
    addresses a message by folder and UID, and checks the id against it.
    An action with both updates and a destination updates first, then moves.
    """

    message_id: str
    folder_id: str
    is_read: bool | None = None
    flag_status: FlagStatus | None = None
    destination: str | None = None
    delete: bool = False
    permanent: bool = False

    @property
    def updates(self) -> bool:
        return self.is_read is not None or self.flag_status is not None


@dataclass(frozen=True)
class ActionOutcome:
    """What the provider did with one action.

    ``done`` is True when the mailbox now has the change (also when it had it
    already: a repeated move answers done). ``message_id``/``folder_id`` say
    where the message is now (IMAP gives a moved message a new id; Graph's
    immutable id stays), ``gone`` that it was deleted for good, ``absent``
    that a delete found no such message (deleted meanwhile: by another client,
    with its folder, or by an earlier try of this one). ``message`` is
    the provider's own record of the result when its answer carried one.
    ``error`` is set when not done; a ``ProviderThrottled`` or
    ``ProviderUnavailable`` there means "try again", anything else is final.
    """

    action: MessageAction
    done: bool
    message_id: str | None = None
    folder_id: str | None = None
    gone: bool = False
    absent: bool = False
    message: Message | None = None
    error: MailsyncError | None = None


@dataclass(frozen=True)
class AttachmentInfo:
    """One attachment as listed with its message (no content)."""

    attachment_id: str
    name: str
    content_type: str
    size: int
    is_inline: bool
    content_id: str | None = None


@dataclass(frozen=True)
class AttachmentContent:
    info: AttachmentInfo
    content: bytes


@dataclass(frozen=True)
class MessageContent:
    """A message read whole from the provider: its record, reply-to, body and attachment list.

    ``body_type`` is ``"html"`` or ``"text"``; an HTML body is as the sender
    wrote it (unsafe): the service sanitises it before anyone displays it.
    """

    message: Message
    reply_to: tuple[Address, ...]
    body: str
    body_type: str
    attachments: tuple[AttachmentInfo, ...]


# The fields an action sets, as the action ledger names them (mailsync.actions.ordering).
READ, FLAG, PLACE = "read", "flag", "place"
LedgerValue = bool | str


@dataclass(frozen=True)
class ActionClaim:
    """An accepted action as the ledger records it: each field it sets and the value it sets.

    ``place`` is the destination folder id of a move or a delete to the
    trash, ``""`` for a permanent delete.
    """

    message_id: str
    fields: dict[str, LedgerValue]


@dataclass(frozen=True)
class Claimed:
    """What ``ActionLedger.claim`` gave one message: its number, and the fields it took over as they were
    (name → (sequence number, value); a field absent had no claim), which ``release`` puts back."""

    seq: int
    prior: dict[str, tuple[int, LedgerValue]]


@dataclass(frozen=True)
class LatestActions:
    """The ledger's entry for one message: per field, the sequence number and value of the latest action.

    ``seq`` is the highest sequence number handed out for the message; every
    claim gets a higher one than the last (mailsync.actions.ordering).
    """

    message_id: str
    seq: int
    fields: dict[str, tuple[int, LedgerValue]]

    def seq_of(self, name: str) -> int:
        return self.fields[name][0] if name in self.fields else 0
