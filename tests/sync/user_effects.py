"""What the user's actions must have done to the mailbox, for messages nobody else changed.

The convergence property (test_convergence.py) checks the store against
the mailbox; that alone would pass if an action were silently dropped, or
undone at the provider by an older one (a job redelivered late, two jobs
run out of order): the next delta round would bring the wrong value into
the store too. So for every message only the user acted on (the person in
Outlook never touched it) and whose actions all ended done, the mailbox
must show the user's actions folded in the order they were accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mailsync.actions.models import MessageAction

GONE = "gone"


def expected_state(actions: Sequence[MessageAction], trash: str | None) -> dict[str, Any]:
    """The fields the user's actions set, the last one winning per field (``folder`` may be ``GONE``)."""
    want: dict[str, Any] = {}
    for action in actions:
        if action.delete:
            want = {"folder": GONE if action.permanent or trash is None else trash}
            continue
        if action.is_read is not None:
            want["isRead"] = action.is_read
        if action.flag_status is not None:
            want["flagStatus"] = action.flag_status.value
        if action.destination is not None:
            want["folder"] = action.destination
    return want


def unapplied(actions: Mapping[str, Sequence[MessageAction]], skip: Iterable[str], snapshot: Mapping[str, Any]
              ) -> tuple[list[tuple[str, dict[str, Any], dict[str, Any] | None]], int]:
    """``(message id, what the user's actions say, what the mailbox has)`` for each message that disagrees,
    and how many messages were checked.

    ``skip``: messages someone else changed, or with an action that failed.
    A message whose wanted folder no longer exists (the person deleted it
    with its mail) is skipped too.
    """
    skipped = set(skip)
    folders = {f["id"] for f in snapshot["folders"]}
    trash = next((f["id"] for f in snapshot["folders"] if f["wellKnownName"] == "deleteditems"), None)
    truth = {m["id"]: m for m in snapshot["messages"]}
    wrong: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    checked = 0
    for message_id, done in actions.items():
        if message_id in skipped or not done:
            continue
        want = expected_state(done, trash)
        folder = want.get("folder")
        if folder not in (None, GONE) and folder not in folders:
            continue
        have = truth.get(message_id)
        checked += 1
        if folder == GONE:
            if have is not None:
                wrong.append((message_id, want, {"folder": have["folderId"]}))
            continue
        if have is None:
            if any(a.delete for a in done) or any(f not in folders for a in done for f in (a.folder_id, a.destination)
                                                  if f is not None):
                continue   # its folder deleted with its mail by the person (the trash emptied, a folder removed)
            wrong.append((message_id, want, None))
            continue
        seen = {"isRead": have["isRead"], "flagStatus": have["flagStatus"], "folder": have["folderId"]}
        if any(seen[key] != value for key, value in want.items()):
            wrong.append((message_id, want, seen))
    return wrong, checked
