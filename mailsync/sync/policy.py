"""Pure decisions of the sync engine: what to work on next, and how to wait.

No I/O here, so each rule is a unit test away: the priority of pending work,
when a full round (initial / resync) must start, and what a provider or
store fault turns into (retry now, or give the folder back and come back
later through the queue).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from mailsync.errors import (
    DependencyUnavailable,
    MailsyncError,
    MalformedResponse,
    ProviderError,
    ProviderThrottled,
    ProviderUnavailable,
    StoreError,
)
from mailsync.models import SyncPhase
from mailsync.providers.graph_client import backoff_delay
from mailsync.storage.sync_rows import SyncState

# Waits up to this long are slept inside the invocation; longer ones are a
# queue visibility delay (a sleeping function still bills and holds a slot).
SHORT_WAIT_S = 2.0
# In-invocation retries of one call before giving the folder back.
MAX_QUICK_RETRIES = 3
# Consecutive failed attempts after which a folder waits for the next trigger
# (notification, poll, user action) instead of re-enqueueing itself.
MAX_FAILURES = 10
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
# Delta can lag behind notifications ("retry the nextLink or deltaLink after
# some time", Microsoft): after a notified round, look again after the first
# wait, and after the next while look-agains find nothing; at most one
# pending per folder.
RELOOK_DELAYS_S = (2.0, 10.0)
# A folder's first round relaxes the store's refresh (a bulk load) only when the folder list says it
# holds at least this many messages. Beginning and ending a bulk load costs two index-settings updates
# (cluster-state publications), two refreshed lease writes, a count and a refresh: ~1 s on the embedded
# node at load 17 (docs/scaling.md, "Onboarding"), paid per folder. What it
# saves is the refreshes the load would have caused, ~one per second of loading: below a few thousand
# messages (a few seconds of bulk writes) that is less than it costs, and onboarding pays it for every
# one of a mailbox's ~13 mostly small folders.
BULK_LOAD_MIN_MESSAGES = 2_000
# Epochs are seconds since this instant, so a recreated row never reuses an
# epoch still written on documents (and the number fits a 32-bit table int).
EPOCH_BASE_S = 1_700_000_000


def next_epoch(previous: int, now: float) -> int:
    """A full round's epoch: larger than every earlier one of the folder."""
    return max(previous + 1, int(now) - EPOCH_BASE_S)


def worth_a_bulk_load(state: SyncState) -> bool:
    """Whether the folder's first round should relax the store's refresh (unknown size: yes, as before)."""
    return state.expected is None or state.expected >= BULK_LOAD_MIN_MESSAGES


# A new account's first pass (mailsync.sync.first_pass) takes the folders the folder list says hold at
# most this many messages: one page each (Graph's page is GRAPH_PAGE_SIZE, 500 by default; a fuller
# folder answers with a next link and goes on in rounds of its own), all of them at most
# FIRST_PASS_MAX_MESSAGES together: one bulk request, as a round's pages are (MAX_BULK_MESSAGES).
FIRST_PASS_FOLDER_MAX = 500
FIRST_PASS_MAX_MESSAGES = 2_000
# Folders read together (``MailProvider.message_changes_many``) by the first pass and a quiet sweep: one
# Graph JSON batch (its limit: 20 requests); the time left is checked again between two.
READS_AT_ONCE = 20


def never_written(state: SyncState, generation: str) -> bool:
    """Nothing was ever written to the store for this folder row: it may start without ``remove_stale``.

    The row was created in the store's current generation, no full round
    of it ever began (``round_started`` is set before a round's, or the
    first screen's, first write) and it has no cursor. A full round's end
    drops what the round did not see; for such a row the store holds
    nothing of the folder to drop. Not so after a lost store (the row's
    generation differs), a resync, a cursor that expired mid-round, or a
    first round that crashed after its first bulk write: each of those has
    ``round_started`` set or another generation, and keeps ``remove_stale``.
    """
    return (state.rounds == 0 and not state.round_started and not state.cursor and not state.mid_round
            and not state.resync_requested and state.generation == generation and state.folder_id is not None)


def first_pass_fits(state: SyncState, generation: str, now: float, *, page_size: int) -> bool:
    """Whether a folder goes in the account's first pass: never written, free, and one provider page
    (``page_size``) or less by the folder list's count."""
    return (never_written(state, generation) and not state.leased(now) and state.not_before <= now
            and fits_one_first_page(state.expected, page_size))


def fits_one_first_page(expected: int | None, page_size: int) -> bool:
    """Whether a folder of ``expected`` messages (the folder list's count) is small enough for the first pass."""
    return expected is not None and expected <= min(FIRST_PASS_FOLDER_MAX, page_size)


def store_lost(state: SyncState, generation: str) -> bool:
    """The store was recreated (deleted, restored, an in-memory store restarted) since this row's last round.

    The store then holds none of the row's messages, however many rounds
    it has: its next round is an initial one again, and it is not done.
    A row without a generation has never run a round.
    """
    return bool(state.generation) and state.generation != generation


def round_done(state: SyncState, generation: str) -> bool:
    """The row's messages are in the store: a first round completed in the store's current generation."""
    return state.rounds > 0 and not store_lost(state, generation)


def needs_full_round(state: SyncState, generation: str) -> bool:
    """Start from scratch: never started, a resync was asked for, or the store was recreated."""
    return not state.cursor or state.resync_requested or state.generation != generation


def backoff_seconds(failures: int, rng: random.Random | None = None, *, cap_s: float = BACKOFF_CAP_S) -> float:
    """Exponential back-off with full jitter over a folder's consecutive failures."""
    return backoff_delay(failures, base_s=BACKOFF_BASE_S, cap_s=cap_s, rng=rng)


def is_pending(state: SyncState, generation: str, now: float) -> bool:
    """Work a free worker should pick up for this row."""
    if state.leased(now) or state.not_before > now:
        return False
    if state.failures >= MAX_FAILURES and not (state.dirty or state.resync_requested):
        return False
    return (state.dirty or state.resync_requested or state.rounds == 0
            or state.phase != SyncPhase.INCREMENTAL or state.generation != generation)


def pending_order(rows: Iterable[SyncState], generation: str, now: float) -> list[SyncState]:
    """Pending rows, most urgent first.

    1. the folder list (new folders, and it gates the first screen);
    2. followed folders with fresh changes (a notification: the user is watching);
    3. the Inbox's initial round (the first screen's folder);
    4. other full rounds, largest folder first (longest job first keeps the
       mailbox's slots busy until the end instead of leaving one long tail).
    """
    def key(state: SyncState) -> tuple[int, int, str]:
        if state.is_folder_list:
            return (0, 0, "")
        if state.rounds > 0 and state.phase == SyncPhase.INCREMENTAL and not state.resync_requested:
            return (1, 0, state.name)
        if state.role == "inbox":
            return (2, 0, "")
        return (3, -(state.expected or 0), state.folder_id or "")

    return sorted((row for row in rows if is_pending(row, generation, now)), key=key)


def next_wake(rows: Iterable[SyncState], generation: str, now: float) -> tuple[SyncState, float] | None:
    """The row a continuation should start next, and after how many seconds; None when nothing is left.

    The most urgent pending row, else the backing-off row (``not_before``
    ahead, would be pending then) that is due first; either way not before
    the mailbox's hold (the folder-list row's ``not_before``, set by a 429)
    ends. Rows leased by others are their holders' to finish, and parked
    rows (too many failures, nothing new) wait for a notification or poll.
    """
    rows = list(rows)
    hold_s = max((row.not_before for row in rows if row.is_folder_list), default=0.0) - now
    pending = pending_order(rows, generation, now)
    if pending:
        return pending[0], max(0.0, hold_s)
    waiting = [row for row in rows if not row.leased(now) and row.not_before > now
               and is_pending(replace(row, not_before=0.0), generation, now)]
    if not waiting:
        return None
    first = min(waiting, key=lambda row: row.not_before)
    return first, max(hold_s, first.not_before - now)


@dataclass(frozen=True)
class Wait:
    """What to do about a transient fault: sleep ``seconds`` here, or come back through the queue."""

    seconds: float
    in_place: bool
    mailbox_wide: bool       # 429: every folder of the mailbox should hold back
    reason: str


def relook_delay(attempt: int) -> float | None:
    """The wait before look-again number ``attempt`` (0-based) after a notified round; None: enough."""
    return RELOOK_DELAYS_S[attempt] if 0 <= attempt < len(RELOOK_DELAYS_S) else None


def retryable(error: BaseException) -> bool:
    """Faults that go away by waiting (as opposed to resync, reauth, or a bug)."""
    return isinstance(error, (ProviderThrottled, ProviderUnavailable, MalformedResponse, DependencyUnavailable,
                              StoreError))


def wait_for(error: MailsyncError, *, attempt: int, failures: int, time_left_s: float,
             rng: random.Random | None = None, cap_s: float = BACKOFF_CAP_S) -> Wait:
    """The wait after a transient fault.

    ``Retry-After`` is honoured as given (throttling, 503); without it the
    wait is exponential with full jitter over the folder's consecutive
    failures. Short waits are slept in place a few times; anything longer,
    or too close to the invocation's end, goes back to the queue.
    """
    retry_after: float | None = None
    if isinstance(error, ProviderThrottled):
        retry_after = error.retry_after_s if error.retry_after_s > 0 else None
    elif isinstance(error, (ProviderUnavailable, DependencyUnavailable)):
        retry_after = error.retry_after_s
    if retry_after is not None:
        seconds = retry_after
    else:
        seconds = backoff_delay(failures + attempt, base_s=BACKOFF_BASE_S, cap_s=cap_s, rng=rng)
    in_place = seconds <= SHORT_WAIT_S and attempt < MAX_QUICK_RETRIES and seconds < time_left_s
    return Wait(seconds=max(0.0, seconds), in_place=in_place,
                mailbox_wide=isinstance(error, ProviderThrottled), reason=error.code)


def is_permanent_provider_error(error: BaseException) -> bool:
    """A provider answer that waiting will not change (400, 403...): counted, backed off, then parked."""
    return isinstance(error, ProviderError) and not retryable(error)
