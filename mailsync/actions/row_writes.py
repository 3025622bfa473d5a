"""The rows the client actions write into the store, at their folders' sync epochs.

Every row an action writes (optimistic, put back, reverted, an IMAP move's
new document) must carry its folder's current sync epoch, or a resync of
that folder that has passed the message already deletes it as unseen
(docs/store.md). ``RowWrites.write_rows`` says how a resync begun during the
write is still honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from mailsync.models import Message
from mailsync.ports import MessageStore

# Runs a call on the actions' shared side pool (MessageActionService._side_task).
SideTask = Callable[..., Future[Any]]


class RowWrites:
    """Action rows into the store at their folders' epochs (see the module docstring)."""

    def __init__(self, store: Callable[[], MessageStore], epochs: Callable[[str, Sequence[str]], Mapping[str, int]],
                 side_task: SideTask) -> None:
        self._store = store
        # The folders' current sync epochs (SyncStateTable.epochs). Required: a wiring that left it out wrote
        # every row in epoch 0 (the convergence test's did).
        self._epochs = epochs
        self._side_task = side_task

    def write_rows(self, account_id: str, rows: Sequence[Message], *,
                    before: Mapping[str, int] | None = None) -> None:
        """Rows into the store at their folders' sync epochs, raised to the epoch of a resync begun meanwhile.

        Every row the service writes carries its folder's current epoch, or a resync of that folder that
        has passed the message deletes it as unseen (docs/store.md). "Current" is read before the write,
        though, and a resync can begin in between: it bumps the epoch, lists the message and writes it in
        the new epoch, and then our write, a whole document, puts the old epoch back over the resync's
        mark. When that resync ends, ``remove_stale`` deletes the row; if the action was a no-op at the
        provider (the other client had moved it there, or set that flag, already) no delta round lists it
        again: missing for good (the convergence test's rare ``missing=1``, a message in Deleted Items after
        a burst of resyncs). So the epochs are read again after the write, and where one rose the row is
        marked as seen by that folder's resync (``MessageStore.raise_epoch``: a seen mark beside the row,
        never an update of it, which would raise its version and refuse the equal-MODSEQ undo). A resync
        begun after that second read pages after our write, so it sees the row like any other. Left open:
        a resync that begins, lists the message and also *ends* between the first read and the mark (one
        bulk write and one point read apart) still deletes it.

        ``before``: the epochs, when the caller read them already. ``_commit`` runs the two halves itself
        (``write_at_epochs``, ``mark_risen_epochs``), publishing between them.
        """
        if not rows:
            return
        if before is None:
            before = self._epochs(account_id, sorted({row.folder_id for row in rows}))
        self.write_at_epochs(account_id, rows, before)
        self.mark_risen_epochs(account_id, rows, before)

    def write_at_epochs(self, account_id: str, rows: Sequence[Message], epochs: Mapping[str, int]) -> None:
        """The rows in one bulk write per epoch value (``epochs``: per folder), not per folder: a bulk action's
        500 rows span a dozen folders, mostly at the same epoch. The groups, disjoint documents, are written
        side by side (500 rows in 11 folders were 7 groups, after resyncs)."""
        if not rows:
            return
        store = self._store()
        by_epoch: dict[int, list[Message]] = {}
        for row in rows:
            by_epoch.setdefault(epochs.get(row.folder_id, 0), []).append(row)
        groups = list(by_epoch.items())
        written = [self._side_task(store.upsert_messages, group, epoch=epoch) for epoch, group in groups[1:]]
        store.upsert_messages(groups[0][1], epoch=groups[0][0])
        for future in written:
            future.result()

    def mark_risen_epochs(self, account_id: str, rows: Sequence[Message], before: Mapping[str, int]) -> None:
        """After ``write_at_epochs``: the epochs read again, and the rows of a folder whose epoch rose since
        ``before`` marked with it (``write_rows`` says why)."""
        if not rows:
            return
        by_folder: dict[str, list[str]] = {}
        for row in rows:
            by_folder.setdefault(row.folder_id, []).append(row.message_id)
        store = self._store()
        for folder_id, epoch in self._epochs(account_id, sorted(by_folder)).items():
            if epoch > before.get(folder_id, 0):
                store.raise_epoch(account_id, folder_id, by_folder[folder_id], epoch)
