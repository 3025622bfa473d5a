"""ACTION jobs out of order: why an older job must not undo a newer action, and how the ledger stops it.

The user marks a message read (job A), then unread (job B). The queue can
run A after B: a redelivery (A's worker died after the provider call), or
A's retry after a 429 while B went through. Applied blindly, A leaves the
provider at "read"; the next delta round carries that with a version newer
than B's optimistic row and the store follows. The user's last action is
gone, and nobody was told.

The store cannot tell this apart: the message document is replaced by
every delta page, so "a newer action's optimistic row" and "a page read
after A's time" look the same. Hence the ledger (``ActionLedger``, on the
search engine: ``mailsync.store.action_ledger``), one entry per message
kept apart from the synced document: for each field an action sets
(``read``, ``flag``, ``place`` = folder or deleted), the sequence number
and value of the latest action accepted. The API claims a number when it
accepts an action (every claim on a message gets a higher one than the
last) and the job carries it.

Before the provider call the job drops every field a newer action claimed
(``current_part``): that newer action's own job writes it, whenever it
runs. An action left with nothing is superseded and done, as folding the
user's actions in order says.

That check and the provider write are not atomic: B can be accepted after
A's check and B's write land before A's (a Graph ``$batch`` item resent
after ``Retry-After`` keeps A's write in flight for seconds). So after the
call the job reads the ledger again; a field it wrote that a newer action
claimed since is written again with the newest value (``reassertion``).
Any action accepted after that second read starts its own write after A's
ended, so it lands last.

IMAP addresses a message by folder and UID, and a move gives it a new id:
a re-assertion there covers flags only, and only when A did not move the
message (then it is still where A found it).
"""

from __future__ import annotations

from dataclasses import replace

from mailsync.actions.models import FLAG, PLACE, READ, ActionClaim, LatestActions, MessageAction
from mailsync.models import FlagStatus


def claim_of(action: MessageAction, trash_destination: str | None) -> ActionClaim:
    """The ledger claim of an accepted action. ``trash_destination``: where a delete moves it (None: for good)."""
    fields: dict[str, bool | str] = {}
    if action.is_read is not None:
        fields[READ] = action.is_read
    if action.flag_status is not None:
        fields[FLAG] = action.flag_status.value
    if action.delete:
        fields[PLACE] = "" if action.permanent or trash_destination is None else trash_destination
    elif action.destination is not None:
        fields[PLACE] = action.destination
    return ActionClaim(message_id=action.message_id, fields=fields)


def current_part(action: MessageAction, seq: int, latest: LatestActions | None) -> MessageAction | None:
    """What of ``action`` (claimed as ``seq``) no newer action has claimed; None when nothing is left."""
    if latest is None:
        return action

    def mine(name: str) -> bool:
        return latest.seq_of(name) <= seq

    if action.delete:
        return action if mine(PLACE) else None
    is_read = action.is_read if action.is_read is not None and mine(READ) else None
    flag = action.flag_status if action.flag_status is not None and mine(FLAG) else None
    destination = action.destination if action.destination is not None and mine(PLACE) else None
    if is_read is None and flag is None and destination is None:
        return None
    return replace(action, is_read=is_read, flag_status=flag, destination=destination)


def reassertion(applied: MessageAction, seq: int, latest: LatestActions | None, *,
                ids_follow_moves: bool) -> MessageAction | None:
    """After ``applied`` reached the provider: the newest values of the fields it wrote that a newer
    action claimed meanwhile (None: none). ``ids_follow_moves``: Graph's immutable ids, which any
    folder reaches; False for IMAP (see the module docstring)."""
    if latest is None:
        return None
    written = {name for name, present in ((READ, applied.is_read is not None),
                                          (FLAG, applied.flag_status is not None),
                                          (PLACE, applied.delete or applied.destination is not None)) if present}
    newer = {name: latest.fields[name][1] for name in written if latest.seq_of(name) > seq}
    if not ids_follow_moves:
        if applied.delete or applied.destination is not None:
            return None
        newer.pop(PLACE, None)
    if not newer:
        return None
    # Where the message is after ``applied`` (IMAP: unmoved, so where it was; Graph ignores it).
    folder_id = applied.destination or applied.folder_id
    place = newer.get(PLACE)
    if place == "":
        return MessageAction(applied.message_id, folder_id, delete=True, permanent=True)
    read = newer.get(READ)
    flag = newer.get(FLAG)
    return MessageAction(applied.message_id, folder_id,
                         is_read=read if isinstance(read, bool) else None,
                         flag_status=FlagStatus(flag) if isinstance(flag, str) else None,
                         destination=place if isinstance(place, str) and place != folder_id else None)
