"""Notified states: the page learns a change from Outlook's notification itself; delta confirms it.

Why: a change reached the store, and the page (``messagesChanged``), only
through a delta round, and Outlook's delta shows a change about a second
after its notification (the sandbox's ``delta_lag_s``; the NOTIFIED job
waits out the lag it learnt). The messages subscription is a rich one whose
``$select`` names every list property (``resource_data.MESSAGE_SELECT``), so
each ``created``/``updated`` notification carries the message as it is
after the change. The webhook tells the page at once, in the POST that
brought it, and writes that state into the store over the message it
holds; the NOTIFIED job's round
still reads delta afterwards and writes what delta says over it.

Trust. The data is taken only from items whose signed clientState vouched
for the account and from a POST whose validation tokens check out; the
``dataSignature`` proves the data was not altered (``resource_data``).
What it may do is bounded by the store's version rule below: it can show a
state early, never hide a newer one, and delta replaces it either way.

What is written, per POST (a POST carries one subscription's items):

* per message id the *last* notification of the POST decides: a move with
  immutable ids is ``deleted`` then ``created`` for the same id (the
  ``created`` wins: the message is in its new folder); a message created
  and deleted in one POST is left alone;
* ``deleted`` writes nothing (no data; a removal is the round's, which
  removes only what still says that folder) but tells the page to drop the
  row from the folder the store holds the message in (read with the same
  multi-get; a message the store does not hold: nothing to tell);
* ``created``/``updated`` with data showing the whole state
  (``resource_data.notified_message``: a subscription made with the older
  folder-only ``$select`` gives none until its renewal replaces it);
* only for an account whose mailbox document says ``synced`` (before its
  initial sync the rounds write everything anyway, and a load's
  ``remove_stale`` must see only its own writes) and only into folders
  the store has (a folder the rounds do not sync, or do not know yet, is
  never written by anyone else, so nothing would ever take it back out);
* only over a message the store holds: a notification never creates a
  document. One the store removed, or never had, is the round's to bring
  in; a copy written from a notification could outlive its message (an
  update delivered late, after a round read the message's deletion; new
  mail created and deleted between two rounds whose ``created`` comes after
  the round that read the deletion: no row, no tombstone, and no delta
  round would ever list it again). So new mail is only *announced*: the
  page is told at once, the store gets it from the round a second or two
  later (a page that reloads its list meanwhile misses it until the round's
  event). A move's target (immutable ids: the store holds the
  message in its old folder) is written;
* a ``created`` only if its state is at most ``CREATED_FRESH_S`` old (by its
  ``lastModifiedDateTime``): a ``created`` Graph redelivers long after (a
  POST retried after our 503) is left to delta.

Cost: one realtime multi-get across two indices (the mailbox and folder
documents, and the messages' documents with their stored versions, bodies
and epochs: ``mailsync.store.notified_writes``), one bulk request (none when
nothing is held), one realtime get of the mailbox document afterwards, one
SignalR REST call; no table call.

Version rule (why a notified state can neither win wrongly nor stick):
store versions are ``message_version(lastModifiedDateTime, observed)``
(``mailsync.providers.graph``): the modification's whole second in ms plus
the milliseconds of when we read it, clamped to 1..999, written with
``version_type=external_gte`` (an equal or higher version wins). A notified
state is written at ``notified_version`` = the floor of its second, no
read-time offset. Hence:

* delta's reading of the *same* state has offset ≥ 1, so it always
  replaces the notified copy (its own body, its own epoch, and the page
  gets it again with a higher version, which the page keeps);
* any state of a *later* second, read by delta or notified, is ≥ the next
  second's floor, above anything of this second: a notified state never
  overwrites a newer second, and a newer second always overwrites it;
* two changes in *one* second: their notified states tie, and the later
  write wins (gte). Arriving out of order, the older one can show until
  delta's round reads the newer one at floor + offset, above both: they
  converge after delta, as the tests show. The notification's
  ``@odata.etag`` (a changeKey) is not ordered, so nothing better exists
  without a read of Graph;
* a user action's optimistic row (``mailsync.actions.versions``) is at the
  action's time T in ms. A notified state modified before T has a floor
  below T and is refused (the action's row stays); one modified after T
  (Outlook applied the action, or another client changed the message
  later) is at most what delta's reading of it would carry, which wins over
  the row today too, and the action ledger's re-assertion restores the
  user's value if it was not yet applied. So the notified write undoes
  nothing that a delta page read at that moment would not.

Documents (why a full write, and what is kept): a partial update would
raise the document's external ``_version`` by one (every engine re-indexes
an update with internal versioning: ``mailsync.store.seen_marks``), which
refused the equal-version writes the rule above needs and lost messages
before. So the webhook reads the stored document (realtime) and indexes a
whole new one at its own version, carrying over what the notification does
not have: ``body_text`` (Graph does not put the body into notifications,
and a full index without it would drop the reader's text until delta's
round rewrote it, a second later) and ``sync_epoch`` (a resync running on
the folder must not take the message for unseen: its ``remove_stale``
deletes what is below its epoch without a seen mark). A version stored
between the read and the write still refuses it (``external_gte``); a
stored version as new or newer skips the write altogether.

Conditional removals and seen marks: a round's removal of the folder a
message left reads the document and deletes it only if it still says that
folder, with ``if_seq_no``: a notified write in between makes it read
again and decide on the new folder, as a round's write does. The notified
write leaves seen marks alone (they are documents of their own).

Unlinked meanwhile: the account's mailbox document is deleted before its
messages (``SearchStore.delete_account``), so a write checked before and
after against that document either lands before the messages' deletion
(which takes it) or finds the mailbox gone afterwards and takes its own
write back (``forget_notified``).

What delta confirms: every notified write is also merged into the pending
row, whose NOTIFIED job runs a round of the folder after the learnt lag; its
delta shows the state (or a newer one) and overwrites the copy, or shows the
message leaving and removes it (the copy kept the stored folder's rule). A
write only ever replaces a document some round wrote, so a message a round
removed stays removed, with one window left: a round's removal landing
between this write's read and its write (milliseconds) when the notified
state is older than the deletion the round read; the removal's tombstone
(the stored version plus one) is below the notified version then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from mailsync.errors import MailsyncError
from mailsync.models import Message, MessagesChanged
from mailsync.monitoring.records import ChangeType
from mailsync.ports import LiveSender
from mailsync.realtime.signalr_messages import BufferingPublisher

if TYPE_CHECKING:
    from mailsync.store.notified_writes import NotifiedWrite

log = logging.getLogger("mailsync.monitoring.notified_states")

# How old (by lastModifiedDateTime's second) a created state may be to be written: Graph delivers within
# seconds; older is a redelivery, which delta has probably overtaken (the module docstring).
CREATED_FRESH_S = 10.0
# Graph's clock may run ahead of ours: a state "from the future" by more than this is not taken.
CLOCK_AHEAD_S = 60.0


@dataclass(frozen=True)
class NotifiedChange:
    """One authentic notification of a POST: its type, its message, the state its data shows (or None)."""

    change_type: ChangeType
    message_id: str
    state: Message | None = None


@dataclass(frozen=True)
class Told:
    """What one POST's notified states did for an account: the rows the page was told, and whether the store
    now holds the notified state of every message the POST named (``stored``: delta's round only confirms
    them, and may come later: ``mailsync.monitoring.notifications``, the confirm delays)."""

    count: int
    stored: bool


class NotifiedStore(Protocol):
    """What the webhook needs of the store (``mailsync.store.search_store.SearchStore``)."""

    def write_notified(self, account_id: str, messages: Sequence[Message], *,
                       created: frozenset[str] = frozenset(), removed: Sequence[str] = ()) -> NotifiedWrite: ...

    def get_mailbox(self, account_id: str) -> object | None: ...

    def forget_notified(self, account_id: str, message_ids: Sequence[str]) -> None: ...


class NotifiedStates:
    """Writes the states one POST's notifications carry and tells the page (the module docstring)."""

    def __init__(self, store: Callable[[], NotifiedStore], live: Callable[[], LiveSender] | None, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        """``store`` and ``live``: how to get the store and the sender of ``messagesChanged`` to the page,
        on first use (the webhook takes notifications with either down or not configured; the rounds then
        write and tell). ``live`` None: the store only."""
        self._get_store = store
        self._get_live = live
        self._clock = clock

    def apply(self, account_id: str, changes: Sequence[NotifiedChange]) -> Told:
        """Write what ``changes`` (one account's, in POST order) show and tell the page; what it was told.

        Never raises for the store or SignalR being unavailable: the notifications still go to the
        pending row, and the round writes and tells what this could not.
        """
        states, created, deleted = self._candidates(changes)
        if not states and not deleted:
            return Told(0, stored=False)
        try:
            store = self._get_store()
            done = store.write_notified(account_id, states, created=created, removed=deleted)
            if not done.synced:
                return Told(0, stored=False)
            if done.written and store.get_mailbox(account_id) is None:
                log.info("account unlinked while its notified states were written: taken back")
                store.forget_notified(account_id, [m.message_id for m in done.written])
                return Told(0, stored=False)
        except MailsyncError as exc:
            log.warning("notified states not written (the round will): %s", exc.code)
            return Told(0, stored=False)
        upserted = (*done.written, *done.announced)
        told = bool(upserted or done.removed) and self._tell(
            MessagesChanged(account_id, upserted=upserted, removed=tuple(done.removed)))
        written = {m.message_id for m in done.written}
        stored = told and not done.announced and not done.removed \
            and all(change.message_id in written for change in changes)
        return Told(len(upserted) + len(done.removed) if told else 0, stored=stored)

    def _candidates(self, changes: Sequence[NotifiedChange]) -> tuple[list[Message], frozenset[str], list[str]]:
        last: dict[str, NotifiedChange] = {}
        for change in changes:
            last.pop(change.message_id, None)        # the last word on an id wins, in POST order
            last[change.message_id] = change
        now = self._clock().timestamp()
        states: list[Message] = []
        created: set[str] = set()
        deleted: list[str] = []
        for change in last.values():
            state = change.state
            if change.change_type is ChangeType.DELETED:
                deleted.append(change.message_id)
                continue
            if state is None or state.modified_at is None:
                continue
            age = now - state.modified_at.timestamp()
            if age < -CLOCK_AHEAD_S:
                continue
            if change.change_type is ChangeType.CREATED:
                if age > CREATED_FRESH_S:
                    continue
                created.add(change.message_id)
            states.append(state)
        return states, frozenset(created), deleted

    def _tell(self, event: MessagesChanged) -> bool:
        if self._get_live is None:
            return False
        one = BufferingPublisher()
        one.publish_changes(event)
        try:
            self._get_live().send(one.messages())
        except MailsyncError as exc:
            # The round's event tells the page a moment later (delta's copy is written, so it is published).
            log.warning("page not told of notified states: %s", exc.code)
            return False
        return True
