"""Delta queries of the mail API: ``mailFolders/{id}/messages/delta`` and ``mailFolders/delta``.

A round is a series of pages: the first call (no token) fixes the round's
bound (the newest change delta may show yet, ``delta_lag_s`` behind the
mailbox), each page's ``@odata.nextLink`` carries a ``$skiptoken`` with the
cursor, and the last page's ``@odata.deltaLink`` a ``$deltatoken`` from
which the next round starts. Tokens are checked the way Outlook checks its
sync states: another user's or folder's token is corrupt (400), a reseed
of the mailbox answers 410 resyncRequired, an expired or evicted state 410
syncStateNotFound, and a token made with the other IdType preference 400.
The token format and the sync-state cache are in graph_sandbox/delta.py
and graph_sandbox/sync_states.py.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from graph_sandbox import payloads
from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.delta import DELTA, SKIP, BadToken, DeltaToken, Tombstone, decode_token, encode_token
from graph_sandbox.mail_request import Ctx, Reply, folder_select, message_select, resolve_folder
from graph_sandbox.mailbox import Folder, Mailbox, Message, newest_first_key
from graph_sandbox.query_options import instant_ms, int_option, parse_delta_filter, parse_orderby
from graph_sandbox.sync_states import SYNC_STATE_INVALID, SYNC_STATE_NOT_FOUND, StateKey

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxState

log = logging.getLogger("graph_sandbox")


class DeltaRoutes:
    """The two delta routes (see the module docstring)."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def _page_size(self, ctx: Ctx) -> int:
        config = ctx.state.config
        size = min(ctx.max_page_size or config.default_page_size, config.max_delta_page_size)
        ctx.applied.append(f"odata.maxpagesize={size}")
        return size

    def _token(self, ctx: Ctx, folder_id: str) -> DeltaToken | None:
        """The state token of a delta call (None: a first call) after every validity check."""
        skip, delta = ctx.query.get("$skiptoken"), ctx.query.get("$deltatoken")
        if skip is None and delta is None:
            return None
        try:
            token = decode_token(skip if skip is not None else delta or "", ctx.state.token_key)
        except BadToken:
            raise _corrupt_state() from None
        if token.kind != (SKIP if skip is not None else DELTA) or token.user_id != ctx.user.id \
                or token.folder_id != folder_id:
            raise _corrupt_state()
        if token.epoch != self._epoch(ctx.box):
            raise self._gone(ctx, folder_id, 410, "resyncRequired",
                             "Resync required. Replace any local cached data with the results of a full sync.")
        now_ms = ctx.state.clock.time_ms()
        if now_ms - token.issued_ms > ctx.state.config.delta_token_ttl_s * 1000:
            raise self._gone(ctx, folder_id, 410, SYNC_STATE_NOT_FOUND,
                             "The sync state generation is not found; the state expired.")
        if token.immutable is not None and folder_id and token.immutable != ctx.immutable:
            # Corso meets this when a link made without Prefer: IdType="ImmutableId" is used with it.
            raise self._gone(ctx, folder_id, 400, SYNC_STATE_INVALID,
                             "The sync state is invalid: it was created with another IdType preference.")
        evicted = ctx.state.delta.cache.check(self._state_key(ctx, folder_id), token.generation)
        if evicted is not None:
            raise self._gone(ctx, folder_id, ctx.state.config.delta_expired_status, SYNC_STATE_NOT_FOUND,
                             evicted.message)
        return token

    def _gone(self, ctx: Ctx, folder_id: str, status: int, code: str, message: str) -> ApiError:
        """A sync state the client named is gone (counted for the benchmarks)."""
        ctx.state.counters.delta_expired += 1
        ctx.state.delta.gone(self._state_key(ctx, folder_id))
        log.info("delta sync state gone: %s %s %s", folder_id or "(folder list)", code, message)
        return ApiError(status, code, message)

    @staticmethod
    def _state_key(ctx: Ctx, folder_id: str) -> StateKey:
        return (ctx.app_id, ctx.user.id, folder_id)

    def _issue(self, ctx: Ctx, token: DeltaToken, *, immutable: bool | None) -> str:
        """Encode a token for a link, as the newest generation of its folder's sync state."""
        generation = ctx.state.delta.cache.issue(self._state_key(ctx, token.folder_id))
        return encode_token(replace(token, generation=generation, immutable=immutable), ctx.state.token_key)

    def _visible_seq(self, ctx: Ctx, box: Mailbox) -> int:
        """The round's bound: the newest change delta may show yet (``delta_lag_s``)."""
        lag_ms = int(ctx.state.config.delta_lag_s * 1000)
        return box.change_clock.visible(ctx.state.clock.time_ms(), lag_ms, box.seq)

    def _round_started(self, ctx: Ctx, folder_id: str) -> None:
        if ctx.state.delta.round_started(self._state_key(ctx, folder_id)):
            ctx.state.counters.delta_restarts += 1

    def _epoch(self, box: Mailbox) -> int:
        return self.state.epoch * 1_000_000 + box.sync_epoch

    def messages_delta(self, ctx: Ctx, ref: str) -> Reply:
        folder = resolve_folder(ctx, ref)
        box, state = ctx.box, ctx.state
        token = self._token(ctx, folder.id)
        now_ms = state.clock.time_ms()
        folder.index.prune_tombstones(now_ms - int(state.config.delta_token_ttl_s * 1000))
        if token is None:
            select = message_select(ctx)
            change_type = ctx.query.get("changeType")
            if change_type is not None and change_type not in ("created", "updated", "deleted"):
                raise bad_request(f"Invalid changeType '{change_type}'. Use created, updated or deleted.")
            received = parse_delta_filter(ctx.query.get("$filter"))
            order = ctx.query.get("$orderby")
            desc = order is not None and parse_orderby(order) == "desc"
            top = self._delta_top(ctx)
            token = DeltaToken(SKIP, ctx.user.id, folder.id, self._epoch(box), since=0,
                               upto=self._visible_seq(ctx, box), cursor=0, issued_ms=now_ms, select=select,
                               change_type=change_type, received_filter=received, newest_first=desc, top=top,
                               top_left=top)
            self._round_started(ctx, folder.id)
        elif token.kind == DELTA:
            token = DeltaToken(SKIP, token.user_id, token.folder_id, token.epoch, since=token.since,
                               upto=max(token.since, self._visible_seq(ctx, box)),
                               cursor=token.since, issued_ms=now_ms, select=token.select,
                               change_type=token.change_type, received_filter=token.received_filter,
                               top=token.top, top_left=token.top)
        if token.since and token.since < folder.index.pruned_through:
            raise self._gone(ctx, folder.id, 410, SYNC_STATE_NOT_FOUND,
                             "The sync state generation is not found; the state expired.")
        size = self._page_size(ctx)
        state.counters.delta_pages += 1
        entries: list[Any]
        next_cursor: Any
        if token.top_left is not None and token.top_left <= 0:
            # $top reached: Outlook ends the round here. What was not returned is
            # not in the deltaLink either (it comes back only if it changes again).
            entries, next_cursor = [], None
        elif token.newest_first and token.since == 0:
            entries, next_cursor = self._scan_newest_first(box, folder, token, _capped(size, token.top_left))
        else:
            entries, next_cursor = self._scan(folder, token, _capped(size, token.top_left))
        select = token.select
        value: list[Any] = []
        for entry in entries:
            if isinstance(entry, Tombstone):
                value.append(payloads.removed(entry.immutable_id if ctx.immutable else entry.key))
            else:
                value.append(payloads.message(entry, box, immutable=ctx.immutable, select=select,
                                              odata_type=True, text_body=ctx.text_body))
        path = f"mailFolders('{folder.id}')/messages/delta"
        context = ctx.context("Collection(message)")
        if next_cursor is None:
            done = DeltaToken(DELTA, token.user_id, token.folder_id, token.epoch, since=token.upto, upto=0, cursor=0,
                              issued_ms=now_ms, select=token.select, change_type=token.change_type,
                              received_filter=token.received_filter, top=token.top, top_left=token.top)
            link = ctx.link(path, {"$deltatoken": self._issue(ctx, done, immutable=ctx.immutable)})
            return Reply(200, payloads.collection(context, value, delta_link=link))
        following = DeltaToken(SKIP, token.user_id, token.folder_id, token.epoch, since=token.since, upto=token.upto,
                               cursor=next_cursor, issued_ms=now_ms, select=token.select,
                               change_type=token.change_type, received_filter=token.received_filter,
                               newest_first=token.newest_first, top=token.top,
                               top_left=None if token.top_left is None else token.top_left - len(entries))
        link = ctx.link(path, {"$skiptoken": self._issue(ctx, following, immutable=ctx.immutable)})
        return Reply(200, payloads.collection(context, value, next_link=link))

    @staticmethod
    def _keeper(token: DeltaToken) -> Callable[[Message | Tombstone], bool]:
        """Does a changed entry belong in this round (changeType, $filter)?"""
        since, change_type = token.since, token.change_type
        bound_ms = instant_ms(token.received_filter[1]) if token.received_filter else None
        strict = token.received_filter is not None and token.received_filter[0] == "gt"

        def keep(entry: Message | Tombstone) -> bool:
            if isinstance(entry, Tombstone):
                return since > 0 and change_type in (None, "deleted")
            if since > 0 and change_type is not None:
                created = entry.entered_seq > since
                if change_type == "deleted" or created != (change_type == "created"):
                    return False
            if bound_ms is None:
                return True
            return entry.received_ms > bound_ms or (not strict and entry.received_ms == bound_ms)
        return keep

    def _scan(self, folder: Folder, token: DeltaToken, size: int) -> tuple[list[Any], int | None]:
        """One page in change order. Returns (entries, next cursor or None at the round's end)."""
        keep = self._keeper(token)
        entries: list[Any] = []
        last = token.cursor
        for seq, entry in self.state.mailbox(token.user_id).folder_changes(folder, token.cursor, token.upto):
            if len(entries) == size:
                if len(entries) > 1 and (self.state.faults.replay_delta_page() or self.state.delta.replay()):
                    # Fault: step back so the next page repeats this page's second half.
                    return entries, entries[len(entries) // 2 - 1].seq
                return entries, last
            last = seq
            if keep(entry):
                entries.append(entry)
        return entries, None

    def _scan_newest_first(self, box: Mailbox, folder: Folder, token: DeltaToken,
                           size: int) -> tuple[list[Any], list[int] | None]:
        """Initial round with $orderby=receivedDateTime desc: newest mail first.

        The cursor is (receivedDateTime ms, serial) of the last message read,
        found again by bisecting the folder's newest-first order (cached until
        its membership changes). Members that changed after the round began
        (seq > U) are skipped here and come in the next round.
        """
        ordered = box.messages_newest_first(folder.id)
        start = 0
        if token.cursor:
            received, serial = token.cursor
            start = bisect.bisect_right(ordered, (-received, -serial), key=newest_first_key)
        keep = self._keeper(token)
        entries: list[Any] = []
        last: Message | None = None
        for message in ordered[start:]:
            if len(entries) == size:
                assert last is not None
                return entries, [last.received_ms, last.serial]
            last = message
            if message.seq <= token.upto and keep(message):
                entries.append(message)
        return entries, None

    def folders_delta(self, ctx: Ctx) -> Reply:
        box, state = ctx.box, ctx.state
        token = self._token(ctx, "")
        now_ms = state.clock.time_ms()
        box.folder_index.prune_tombstones(now_ms - int(state.config.delta_token_ttl_s * 1000))
        if token is None:
            token = DeltaToken(SKIP, ctx.user.id, "", self._epoch(box), since=0, upto=self._visible_seq(ctx, box),
                               cursor=0, issued_ms=now_ms, select=folder_select(ctx))
            self._round_started(ctx, "")
        elif token.kind == DELTA:
            token = DeltaToken(SKIP, token.user_id, "", token.epoch, since=token.since,
                               upto=max(token.since, self._visible_seq(ctx, box)),
                               cursor=token.since, issued_ms=now_ms, select=token.select)
        if token.since and token.since < box.folder_index.pruned_through:
            raise self._gone(ctx, "", 410, SYNC_STATE_NOT_FOUND,
                             "The sync state generation is not found; the state expired.")
        size = self._page_size(ctx)
        value: list[Any] = []
        next_cursor: int | None = None
        last = token.cursor
        for seq, entry in box.folder_index.scan(token.cursor, token.upto):
            if len(value) == size:
                next_cursor = last
                break
            last = seq
            if isinstance(entry, Tombstone):
                if token.since > 0:
                    value.append(payloads.removed(entry.key, odata_type=payloads.FOLDER_TYPE))
            else:
                value.append(payloads.mail_folder(entry, box, select=token.select, odata_type=True))
        context = ctx.context("Collection(mailFolder)")
        if next_cursor is None:
            done = DeltaToken(DELTA, token.user_id, "", token.epoch, since=token.upto, upto=0, cursor=0,
                              issued_ms=now_ms, select=token.select)
            return Reply(200, payloads.collection(context, value, delta_link=ctx.link(
                "mailFolders/delta", {"$deltatoken": self._issue(ctx, done, immutable=None)})))
        following = DeltaToken(SKIP, token.user_id, "", token.epoch, since=token.since, upto=token.upto,
                               cursor=next_cursor, issued_ms=now_ms, select=token.select)
        return Reply(200, payloads.collection(context, value, next_link=ctx.link(
            "mailFolders/delta", {"$skiptoken": self._issue(ctx, following, immutable=None)})))

    @staticmethod
    def _delta_top(ctx: Ctx) -> int | None:
        """``$top`` on a message delta: not a page size but the most items one round returns.

        Outlook pages by ``Prefer: odata.maxpagesize``; with ``$top=N`` it
        stops the round after N items (the nextLink after them answers an
        empty page and a deltaLink, microsoft-graph-docs-contrib#7946), so a
        client that pages with ``$top`` silently misses the rest of the folder.
        """
        if "$top" not in ctx.query:
            return None
        top = int_option(ctx.query, "$top", 0)
        if top < 1:
            raise bad_request("Invalid value for $top: it must be a positive integer.")
        return top


def _corrupt_state() -> ApiError:
    return ApiError(400, "ErrorInvalidSyncStateData", "The sync state data is corrupt or otherwise invalid.")


def _capped(size: int, left: int | None) -> int:
    return size if left is None else max(1, min(size, left))
