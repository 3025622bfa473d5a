"""An accepted action as the store and the queue see it (``Planned``), and its form inside an ACTION job.

The job carries, per action, what the provider is asked, the optimistic
version and folder (what an undo needs) and the ledger's number; the rest of
the row is read again when the job runs, so a job stays small (500 actions
fit in one queue message) and never carries a stale copy of the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from mailsync.actions.models import MessageAction
from mailsync.actions.requests import FLAGS
from mailsync.errors import PoisonJob
from mailsync.models import Message


@dataclass(frozen=True)
class Planned:
    """One action as the store and the queue see it."""

    action: MessageAction                 # what the provider is asked (folder_id: where it is now)
    row: Message | None                   # the optimistic row (None: removed from the store)
    version: int                          # the optimistic version
    seq: int = 0                          # the action ledger's number for it (0: not claimed)
    before: Message | None = None         # the row as the store had it (only while accepting; not in the job)


def encode_actions(planned: Sequence[Planned]) -> str:
    """The job's actions, compact: what the worker needs to apply and to undo each."""
    return orjson.dumps([{
        "m": p.action.message_id, "f": p.action.folder_id, "r": p.action.is_read,
        "s": p.action.flag_status.value if p.action.flag_status else None, "d": p.action.destination,
        "x": p.action.delete, "p": p.action.permanent, "v": p.version,
        "o": p.row.folder_id if p.row is not None else None, "q": p.seq,
    } for p in planned]).decode()


def decode_actions(text: str) -> list[Planned]:
    """The job's actions; PoisonJob when they are not what ``encode_actions`` writes."""
    try:
        items = orjson.loads(text)
        found = []
        for item in items:
            action = MessageAction(message_id=str(item["m"]), folder_id=str(item["f"]), is_read=item["r"],
                                   flag_status=FLAGS[item["s"]] if item["s"] else None, destination=item["d"],
                                   delete=bool(item["x"]), permanent=bool(item["p"]))
            # Only the optimistic folder is needed of the row (for undoing it); the rest is read again.
            row = None if item["o"] is None else Message(account_id="", message_id=action.message_id,
                                                         folder_id=str(item["o"]), version=int(item["v"]))
            # "q" absent: a job queued before the ledger; 0 loses to any claim (a newer action wins).
            found.append(Planned(action=action, row=row, version=int(item["v"]), seq=int(item.get("q") or 0)))
        return found
    except (ValueError, KeyError, TypeError) as exc:
        raise PoisonJob(f"ACTION job has unreadable actions: {exc}") from exc
