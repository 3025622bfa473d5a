"""A user acting through mailsync's own API while the mailbox changes: the second actor of the convergence tests.

Used by tests/sync/test_convergence.py (Outlook, on the Graph sandbox) and
tests/sync/test_imap_convergence.py (Dovecot). The world needs ``tables``,
``store``, ``queue``, ``state`` (the cursor table), ``account_id`` and ``token`` (the account's bearer);
the user sets ``world.actions``, which the queue pump runs ACTION jobs with.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from mailsync.actions.models import MessageAction
from mailsync.actions.service import MessageActionService
from mailsync.errors import InputError, NotFound
from mailsync.linking.access import AccountAccess
from mailsync.models import MessageQuery
from mailsync.ports import MessageActionsFactory
from mailsync.store.action_ledger import SearchActionLedger


class User:
    """Acts on what the store shows through ``MessageActionService`` — what the page's buttons call.

    Concurrently with the person in the other mail client and every fault: marks read /
    unread, flags, moves, deletes (to Deleted Items and for good), one
    message or a handful at once. A message the person deleted meanwhile is
    a clear 404 (``NotFound``), never a crash. ``fates`` counts what the
    service reports of each accepted action: it must end done or failed.
    """

    def __init__(self, world: Any, rng: random.Random, actions: MessageActionsFactory) -> None:
        self.world = world
        self.rng = rng
        self.fates: dict[str, int] = {}
        self.queued: set[str] = set()       # message ids of accepted actions
        self.ended: set[str] = set()        # message ids whose action ended done or failed
        self.accepted: dict[str, list[MessageAction]] = {}   # per message, in the order accepted
        self.failed: set[str] = set()       # message ids with an action that failed for good
        self.refused = 0
        self.lock = threading.Lock()
        ledger = SearchActionLedger.of(world.store)
        self.service = MessageActionService(AccountAccess(world.tables.accounts), world.tables.accounts,
                                            lambda: world.store, actions, lambda: world.queue,
                                            ledger=lambda: ledger, epochs=world.state.epochs,
                                            observe=self.observe)
        world.actions = self.service

    def observe(self, action: MessageAction, fate: str) -> None:
        # Counted per message id: a job delivered twice (the faults) ends the same action twice.
        with self.lock:
            self.fates[fate] = self.fates.get(fate, 0) + 1
            if fate == "queued":
                self.queued.add(action.message_id)
                self.accepted.setdefault(action.message_id, []).append(action)
            elif fate in ("done", "failed"):
                self.ended.add(action.message_id)
            if fate == "failed":
                self.failed.add(action.message_id)

    def step(self) -> None:
        world = self.world
        page = world.store.list_messages(world.account_id, MessageQuery(limit=50))
        folders = [v.folder.folder_id for v in world.store.list_folders(world.account_id)
                   if v.folder.role not in ("outbox", "drafts", "conversationhistory")]
        if not page.messages or not folders:
            return
        rows = self.rng.sample(page.messages, k=min(len(page.messages), self.rng.choice((1, 1, 1, 5))))
        kind = self.rng.choice(["read", "unread", "flag", "unflag", "move", "delete", "purge"])
        change: dict[str, Any] = {
            "read": {"is_read": True}, "unread": {"is_read": False}, "flag": {"flag_status": "flagged"},
            "unflag": {"flag_status": "notFlagged"}, "move": {"folder_id": self.rng.choice(folders)},
        }.get(kind, {})
        try:
            if len(rows) > 1:
                action = {"delete": True, "permanent": kind == "purge"} if kind in ("delete", "purge") else change
                self.service.bulk(world.account_id, world.token, {"message_ids": [m.message_id for m in rows],
                                                                  "action": action})
            elif kind in ("delete", "purge"):
                self.service.delete(world.account_id, world.token, rows[0].message_id,
                                    "true" if kind == "purge" else None)
            else:
                self.service.update(world.account_id, world.token, rows[0].message_id, change)
        except (NotFound, InputError):
            self.refused += 1          # gone or its folder gone meanwhile: the API says so, nothing queued
