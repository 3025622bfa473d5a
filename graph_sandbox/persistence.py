"""The sandbox's state on disk, so ``make run`` can be stopped and started with accounts linked.

Without it every restart would strand linked Outlook accounts: their
refresh tokens, their subscriptions and the mail changed on the sandbox's
page would be gone, while the product (its tokens, cursors and
subscription rows in Azurite, under ``.local/``) still relies on them.

What is saved (one file, ``SandboxConfig.state_path``; the CLI's
``--state-file``, which ``make run`` points at ``.local/graph-sandbox/``):

- the mailboxes, whole: folders, messages, ids, change counters and the
  delta change indexes, so delta links issued before the restart go on
  working (tokens are signed with a key derived from the seed);
- the identity platform: sign-in sessions, codes, refresh tokens, the
  revocation dates and the RSA signing key, so access and refresh tokens
  issued before stay valid;
- revoked grants, the sandbox clock's offset, the reset epoch;
- the delta token cache's generations, so links older than the newest
  three of a folder stay gone after a restart;
- subscriptions (with held notifications) and the notifications still
  queued for delivery.

Not saved: run-time knobs (faults, latency, rate limits: the command line
decides them again), counters, throttle windows.

Format: a pickle of plain objects, written to a temporary file, fsynced,
then renamed over the old one — a crash leaves the previous complete
snapshot, never half of one. Pickle because the state is a graph of the
sandbox's own objects (messages shared between a folder's index, the id
maps and caches) and it is read back only by the same code that wrote it
from a file under our own ``.local/``; it is never read from anywhere else.
A snapshot written by another format version or for other data (seed,
users, messages per user, anchor) is not loaded: it is moved aside
(``*.discarded-<time>``) and the sandbox starts from its seed, saying so.

When: at start (load), every ``SAVE_INTERVAL_S`` if anything changed (a
cheap fingerprint of change counters and table sizes decides; nothing is
written while idle), and at shutdown (aiohttp's cleanup, which SIGTERM
triggers). Tests keep the sandbox in memory: no ``state_path``, no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

from graph_sandbox import identity_records, subscriptions
from graph_sandbox.delta import ChangeIndex, Tombstone
from graph_sandbox.mailbox import Folder, Mailbox, Message

log = logging.getLogger("graph_sandbox.persistence")

# 2: mailboxes carry search folders and the times of their changes (delta's lag), and the
# delta token cache's generations are saved (graph_sandbox/sync_states.py).
FORMAT = 2
SAVE_INTERVAL_S = 1.0
# Attributes of a Mailbox that tie it to this process (listeners, the clock), set again on load.
_PROCESS_BOUND = ("_listeners", "_own_listeners", "_clock")


class SavedStateMismatch(Exception):
    """A snapshot that does not belong to this sandbox's data or code version."""


class SandboxPersistence:
    """Loads, periodically saves and finally saves one sandbox's state."""

    def __init__(self, path: Path, state: Any, identity: Any, subscriptions: Any) -> None:
        self.path = path
        self.state = state
        self.identity = identity
        self.subscriptions = subscriptions
        self._saved: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self.saves = 0

    # -- load ---------------------------------------------------------------------------

    def load(self) -> bool:
        """Restore the saved state if there is a usable one; True when something was loaded."""
        if not self.path.exists():
            return False
        try:
            with self.path.open("rb") as handle:
                saved = pickle.load(handle)  # our own file under .local/ (module docstring)
            self._check(saved)
        except (SavedStateMismatch, pickle.UnpicklingError, EOFError, AttributeError, ImportError,
                KeyError, TypeError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.name}.discarded-{int(time.time())}")
            self.path.replace(aside)
            log.warning("Graph sandbox: saved state %s not used (%s); kept as %s, starting from the seed",
                        self.path, exc, aside)
            return False
        self._restore(saved)
        self._saved = self._fingerprint()
        log.info("Graph sandbox: state restored from %s (%d subscriptions)", self.path,
                 len(saved["subscriptions"]["subscriptions"]))
        return True

    def _check(self, saved: Any) -> None:
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise SavedStateMismatch("written by another version of the sandbox")
        if saved.get("shapes") != _shapes():
            raise SavedStateMismatch("the sandbox's records changed shape since it was written")
        if saved.get("data") != _data_key(self.state.config):
            raise SavedStateMismatch(f"made for other data {saved.get('data')}, not {_data_key(self.state.config)}")

    def _restore(self, saved: dict[str, Any]) -> None:
        state = self.state
        boxes = [_mailbox_from(fields, state) for fields in saved["mailboxes"]]
        state.epoch = saved["epoch"]
        state.mailboxes.replace_all(boxes, epoch=saved["epoch"])
        state._revoked = set(saved["revoked"])
        state.clock._offset_s = float(saved["clock_offset_s"])
        state.delta.cache.import_state(saved["delta_generations"])
        self.identity.import_state(saved["identity"])
        self.subscriptions.import_state(saved["subscriptions"])

    # -- save ---------------------------------------------------------------------------

    def save(self, *, force: bool = False) -> bool:
        """Write the state if it changed since the last save (or ``force``); True when written."""
        fingerprint = self._fingerprint()
        if not force and fingerprint == self._saved:
            return False
        state = self.state
        snapshot = {
            "format": FORMAT,
            "shapes": _shapes(),
            "data": _data_key(state.config),
            "saved_at": time.time(),
            "epoch": state.epoch,
            "mailboxes": [_mailbox_fields(box) for box in state.mailboxes],
            "revoked": sorted(state._revoked),
            "clock_offset_s": state.clock.offset_s,
            "delta_generations": state.delta.cache.export_state(),
            "identity": self.identity.export_state(),
            "subscriptions": self.subscriptions.export_state(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with temporary.open("wb") as handle:
            pickle.dump(snapshot, handle, protocol=pickle.HIGHEST_PROTOCOL)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.path)
        self._saved = fingerprint
        self.saves += 1
        return True

    def _fingerprint(self) -> tuple[Any, ...]:
        state = self.state
        return (state.epoch, tuple((box.user_id, box.seq, box.sync_epoch) for box in state.mailboxes),
                tuple(sorted(state._revoked)), state.clock.offset_s, self.identity.fingerprint(),
                self.subscriptions.fingerprint())

    # -- the loop -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="graph-sandbox-persistence")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.save()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL_S)
            try:
                self.save()
            except OSError:  # disk full, permissions: keep serving, say it, try again next time
                log.exception("Graph sandbox: could not save its state to %s", self.path)


def _data_key(config: Any) -> dict[str, Any]:
    """What decides the seeded data: a snapshot is only valid for the same values."""
    return {"seed": config.seed, "users": config.users, "messages_per_user": config.messages_per_user,
            "anchor": config.anchor.isoformat()}


def _shapes() -> dict[str, list[str]]:
    """The fields of every saved record type. Pickle restores slotted records by
    name: a field added since (another branch's new feature) would be missing
    on the loaded objects and fail later, mid-request. A changed shape makes
    the snapshot unusable instead (moved aside, the sandbox starts from its seed)."""
    records: list[type] = [Folder, Message, Tombstone, subscriptions.Subscription,
                           identity_records.Session, identity_records.AuthCode, identity_records.RefreshToken,
                           identity_records.Scopes]
    shapes = {cls.__name__: [f.name for f in dataclasses.fields(cls)] for cls in records}
    shapes["ChangeIndex"] = sorted(ChangeIndex.__slots__)
    return shapes


def _mailbox_fields(box: Mailbox) -> dict[str, Any]:
    return {k: v for k, v in vars(box).items() if k not in _PROCESS_BOUND}


def _mailbox_from(fields: dict[str, Any], state: Any) -> Mailbox:
    # A fresh mailbox first, so attributes added to Mailbox since the save keep
    # their initial values; then everything saved on top of it.
    box = state.mailboxes.new_mailbox(fields["user_id"], fields["address"], fields["display_name"],
                                      fields["_salt"].decode())
    vars(box).update(fields)
    return box
