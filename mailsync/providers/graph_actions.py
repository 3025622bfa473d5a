"""The client half on Outlook: ``MessageActions`` over Microsoft Graph (or the local sandbox).

Reading:

* ``GET me/messages/{id}`` with the stored fields plus ``body`` and
  ``replyTo``, ``Prefer: outlook.body-content-type="html"`` (the page shows
  the body as the sender formatted it, after sanitising), then, when
  ``hasAttachments``, ``GET …/attachments?$select=`` of the listing fields
  (never ``contentBytes``: a list of 20 MB files would be 20 MB per item).
* An attachment: its metadata first (to refuse one over the size bound
  before any byte of it moves), then ``GET …/attachments/{id}/$value``,
  read as a stream and cut off past the bound anyway.

Acting, in JSON batches (``POST $batch``, at most 20 items):

* read / flag: ``PATCH me/messages/{id}`` with ``isRead`` and
  ``flag.flagStatus``; move: ``POST …/move`` with ``destinationId``;
  delete: ``POST …/move`` to the well-known ``deleteditems`` (what
  Outlook's delete does), or ``POST …/permanentDelete``. Not ``DELETE``:
  an ACTION job redelivered after its delete went through sends it again,
  and a ``DELETE`` of a message already in Deleted Items deletes it for
  good; the move is a no-op there.
* Each item carries its own ``Prefer: IdType="ImmutableId"``: headers of the
  batch request do not apply to its items, and without it the answer of a
  move would name the message by a REST id that changes with every move.
* Graph sends Outlook up to four items of an unordered batch at once, and
  each counts against the mailbox's four concurrent requests; with
  ``dependsOn`` it sends one item at a time, so up to four such batches may
  run at once (throttling-limits, "Outlook service limits for JSON
  batching"). A caller holding ``parallel`` of the mailbox's request slots
  (a bulk job, mailsync.actions.worker) gets that many chained batches in
  flight at once: 500 actions are 25 batches in ceil(25 / 4) = 7 round
  trips instead of 25. Otherwise, and for whatever a first round left
  over, batches are unordered and go one at a time (one already fills the
  mailbox's slots), so a failing item stops nothing else.
* In a chained batch an item that fails stops the rest of its chain: they
  are answered 424 (Failed Dependency) without being run, and are sent
  again at once in the next round, unordered.
* Items answered 429 / 503 / 504 (MailboxConcurrency, a sync call holding a
  slot) are sent again in the next batch after their ``Retry-After``, up to
  ``retry_rounds`` times or while the wait stays under ``max_wait_s``;
  past that the outcome carries the ``ProviderThrottled`` /
  ``ProviderUnavailable`` so the caller can try later.
* An action with updates and a move is two steps in that order (the PATCH
  round first, then the move round), as Outlook applies them.
* Idempotence: a PATCH to the values the message has is a no-op at Graph
  (no new change key), a move to the folder it is already in answers the
  message (so a delete to the trash, being a move, is one too), and a
  permanentDelete, or a delete, of a message that is not there any more
  (404) counts as done: a retried action answers as done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from mailsync.actions.models import (
    ActionOutcome,
    AttachmentContent,
    AttachmentInfo,
    MessageAction,
    MessageContent,
)
from mailsync.errors import (
    MailsyncError,
    MalformedResponse,
    NotFound,
    PayloadTooLarge,
    ProviderThrottled,
    ProviderUnavailable,
)
from mailsync.models import Account, Address, Message
from mailsync.ports import TokenProvider
from mailsync.providers.graph import MESSAGE_FIELDS, GraphProviderFactory, map_message
from mailsync.providers.graph_client import GraphClient, error_for_status

BATCH_LIMIT = 20
FAILED_DEPENDENCY = 424          # an item of a dependsOn chain not run because an earlier one failed
IMMUTABLE = 'IdType="ImmutableId"'
DELETED_ITEMS = "deleteditems"   # a well-known folder name: Graph resolves it in every mailbox
READ_FIELDS = ",".join((*MESSAGE_FIELDS, "body", "replyTo"))
ATTACHMENT_FIELDS = "id,name,contentType,size,isInline"


@dataclass
class _Step:
    """One request of an action, waiting for its batch."""

    index: int                   # position of the action in the caller's list
    method: str
    url: str
    body: dict[str, Any] | None
    kind: str                    # update | move | delete


# A batch's answers by item id: (status, the error or None, the body).
_Answers = dict[str, tuple[int, MailsyncError | None, Any]]


def _mid(message_id: str) -> str:
    if not message_id or len(message_id) > 512:
        raise NotFound("no such message")
    return quote(message_id, safe="")


def _address(value: Any) -> Address | None:
    email = (value or {}).get("emailAddress") or {}
    address = email.get("address")
    if not isinstance(address, str):
        return None
    return Address(address=address, name=str(email.get("name") or ""))


class GraphActions:
    """``MessageActions`` for one Outlook account, over one ``GraphClient``."""

    def __init__(self, client: GraphClient, account_id: str, *, retry_rounds: int = 5, max_wait_s: float = 10.0,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._account_id = account_id
        self._retry_rounds = retry_rounds
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._sleep = sleep

    # --- reading ------------------------------------------------------------------------------

    def read_message(self, folder_id: str, message_id: str) -> MessageContent:
        observed_ms = int(self._clock() * 1000)
        item = self._client.get(f"me/messages/{_mid(message_id)}", params={"$select": READ_FIELDS},
                                headers={"Prefer": 'outlook.body-content-type="html"'})
        if not isinstance(item, dict):
            raise MalformedResponse("Graph message is not an object")
        message = map_message(item, self._account_id, str(item.get("parentFolderId") or folder_id),
                              observed_ms=observed_ms)
        body = item.get("body") or {}
        body_type = "html" if body.get("contentType") == "html" else "text"
        attachments: tuple[AttachmentInfo, ...] = ()
        if item.get("hasAttachments"):
            listed = self._client.get(f"me/messages/{_mid(message_id)}/attachments",
                                      params={"$select": ATTACHMENT_FIELDS})
            values = listed.get("value") if isinstance(listed, dict) else None
            if not isinstance(values, list):
                raise MalformedResponse("Graph attachment list has no value array")
            attachments = tuple(_attachment_info(value) for value in values)
        reply_to = tuple(a for a in (_address(v) for v in item.get("replyTo") or ()) if a is not None)
        return MessageContent(message=message, reply_to=reply_to, body=str(body.get("content") or ""),
                              body_type=body_type, attachments=attachments)

    def read_attachment(self, folder_id: str, message_id: str, attachment_id: str, *,
                        max_bytes: int) -> AttachmentContent:
        path = f"me/messages/{_mid(message_id)}/attachments/{_mid(attachment_id)}"
        info = _attachment_info(self._client.get(path, params={"$select": ATTACHMENT_FIELDS}))
        if info.size > max_bytes:
            raise PayloadTooLarge(f"the attachment is {info.size} bytes, over the {max_bytes} this server sends",
                                  code="attachment_too_large")
        content, _ = self._client.get_bytes(f"{path}/$value", max_bytes=max_bytes)
        return AttachmentContent(info=info, content=content)

    # --- acting ---------------------------------------------------------------------------------

    def apply(self, actions: Sequence[MessageAction], *, parallel: int = 1) -> list[ActionOutcome]:
        """``parallel``: how many of the mailbox's concurrent requests the caller holds for this call (that
        many chained batches in flight at once; 1: unordered batches, one at a time)."""
        outcomes: dict[int, ActionOutcome] = {}
        messages: dict[int, Message] = {}
        # Round 1: updates; round 2: moves and deletes of what round 1 did not fail.
        updates = [_Step(n, "PATCH", f"me/messages/{_mid(a.message_id)}", _patch_body(a), "update")
                   for n, a in enumerate(actions) if a.updates and not a.delete]
        self._run(updates, actions, outcomes, messages, parallel)
        second: list[_Step] = []
        for n, action in enumerate(actions):
            if n in outcomes:
                continue
            if action.delete:
                if action.permanent:
                    second.append(_Step(n, "POST", f"me/messages/{_mid(action.message_id)}/permanentDelete", None,
                                        "delete"))
                else:
                    second.append(_Step(n, "POST", f"me/messages/{_mid(action.message_id)}/move",
                                        {"destinationId": DELETED_ITEMS}, "delete"))
            elif action.destination is not None:
                second.append(_Step(n, "POST", f"me/messages/{_mid(action.message_id)}/move",
                                    {"destinationId": action.destination}, "move"))
        self._run(second, actions, outcomes, messages, parallel)
        for n, action in enumerate(actions):
            if n not in outcomes:   # updates only, and they worked
                message = messages.get(n)
                outcomes[n] = ActionOutcome(action=action, done=True, message_id=action.message_id,
                                            folder_id=message.folder_id if message else action.folder_id,
                                            message=message)
        return [outcomes[n] for n in range(len(actions))]

    def _run(self, steps: list[_Step], actions: Sequence[MessageAction], outcomes: dict[int, ActionOutcome],
             messages: dict[int, Message], parallel: int) -> None:
        """Send ``steps`` in batches; record failures in ``outcomes`` and answered messages in ``messages``.

        The first round chains each batch (``dependsOn``) and sends ``parallel`` of them at once when the
        caller holds that many slots and there is more than one batch to fill them; every later round
        (items not run, throttled, unavailable) sends unordered batches one at a time.
        """
        pending = list(steps)
        rounds = 0
        chained = parallel > 1 and len(pending) > BATCH_LIMIT
        while pending:
            chunks = [pending[start:start + BATCH_LIMIT] for start in range(0, len(pending), BATCH_LIMIT)]
            answered = self._send_chunks(chunks, chained, parallel if chained else 1)
            retry: list[_Step] = []
            not_run: list[_Step] = []
            wait = 0.0
            for chunk, answers in zip(chunks, answered, strict=True):
                if isinstance(answers, MailsyncError):
                    for step in chunk:
                        outcomes[step.index] = ActionOutcome(action=actions[step.index], done=False, error=answers)
                    continue
                for position, step in enumerate(chunk):
                    status, error, body = answers.get(
                        str(position), (0, MalformedResponse("Graph's batch left an item out"), None))
                    action = actions[step.index]
                    if error is None:
                        self._record(step, action, body, outcomes, messages)
                    elif chained and status == FAILED_DEPENDENCY:
                        not_run.append(step)
                    elif step.kind == "delete" and isinstance(error, NotFound):
                        # Already gone: done (a retried delete), and said so (no trash copy to keep either).
                        outcomes[step.index] = _deleted(action, absent=True)
                    elif isinstance(error, (ProviderThrottled, ProviderUnavailable)):
                        retry.append(step)
                        wait = max(wait, error.retry_after_s or 0.0)
                    else:
                        outcomes[step.index] = ActionOutcome(action=action, done=False, error=error)
            chained = False
            if retry:
                rounds += 1
                if rounds > self._retry_rounds or wait > self._max_wait_s:
                    error = ProviderThrottled("Graph kept refusing the action; try again later",
                                              retry_after_s=max(wait, 1.0))
                    for step in retry:
                        outcomes[step.index] = ActionOutcome(action=actions[step.index], done=False, error=error)
                    retry = []
                else:
                    self._sleep(wait or min(0.1 * 2 ** rounds, 2.0))
            # In the caller's order: an update's round stays ahead of nothing, but logs and tests read easier.
            pending = sorted(retry + not_run, key=lambda step: step.index)

    def _record(self, step: _Step, action: MessageAction, body: Any, outcomes: dict[int, ActionOutcome],
                messages: dict[int, Message]) -> None:
        """One item Graph carried out: the message it answered, and the outcome of a move or a delete."""
        if isinstance(body, dict) and body.get("id"):
            message = map_message(body, self._account_id, str(body.get("parentFolderId") or action.folder_id),
                                  observed_ms=int(self._clock() * 1000))
            messages[step.index] = message
        if step.kind == "delete":
            outcomes[step.index] = _deleted(action)
        elif step.kind == "move":
            moved = messages.get(step.index)
            outcomes[step.index] = ActionOutcome(action=action, done=True, message_id=action.message_id,
                                                 folder_id=moved.folder_id if moved else action.destination,
                                                 message=moved)

    def _send_chunks(self, chunks: list[list[_Step]], chained: bool, lanes: int
                     ) -> list[_Answers | MailsyncError]:
        """Each chunk as one ``$batch``, ``lanes`` of them in flight at once; per chunk its answers, or the error
        that refused the whole batch (throttled / unavailable: every item answered as such, to be resent)."""

        def send(chunk: list[_Step]) -> _Answers | MailsyncError:
            try:
                return self._batch(chunk, chained=chained)
            except (ProviderThrottled, ProviderUnavailable) as exc:
                status = 429 if isinstance(exc, ProviderThrottled) else 503
                return {str(i): (status, exc, None) for i in range(len(chunk))}
            except MailsyncError as exc:
                return exc

        if lanes <= 1 or len(chunks) <= 1:
            return [send(chunk) for chunk in chunks]
        with ThreadPoolExecutor(max_workers=min(lanes, len(chunks)), thread_name_prefix="graph-batch") as pool:
            return list(pool.map(send, chunks))

    def _batch(self, chunk: list[_Step], *, chained: bool = False) -> _Answers:
        requests = []
        for position, step in enumerate(chunk):
            item: dict[str, Any] = {"id": str(position), "method": step.method, "url": f"/{step.url}",
                                    "headers": {"Prefer": IMMUTABLE}}
            if chained and position:
                item["dependsOn"] = [str(position - 1)]
            if step.body is not None:
                item["body"] = step.body
                item["headers"]["Content-Type"] = "application/json"
            requests.append(item)
        answer = self._client.request("POST", "$batch", json_body={"requests": requests})
        responses = answer.get("responses") if isinstance(answer, dict) else None
        if not isinstance(responses, list):
            raise MalformedResponse("Graph's batch answer has no responses array")
        found: _Answers = {}
        for response in responses:
            if not isinstance(response, dict) or not isinstance(response.get("status"), int):
                continue
            status, body = response["status"], response.get("body")
            headers = response.get("headers") or {}
            retry_after = next((str(v) for k, v in headers.items() if k.lower() == "retry-after"), None)
            error = None if 200 <= status < 300 else error_for_status(status, body, retry_after)
            found[str(response.get("id"))] = (status, error, body)
        return found

    def close(self) -> None:
        self._client.close()


def _deleted(action: MessageAction, *, absent: bool = False) -> ActionOutcome:
    # The message went to Deleted Items; the delta of that folder brings it in. The store
    # drops it from where it was either way (the page removes the row).
    return ActionOutcome(action=action, done=True, gone=True, absent=absent)


def _patch_body(action: MessageAction) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if action.is_read is not None:
        body["isRead"] = action.is_read
    if action.flag_status is not None:
        body["flag"] = {"flagStatus": action.flag_status.value}
    return body


def _attachment_info(value: Any) -> AttachmentInfo:
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise MalformedResponse("Graph attachment without id")
    size = value.get("size")
    return AttachmentInfo(attachment_id=value["id"], name=str(value.get("name") or "attachment"),
                          content_type=str(value.get("contentType") or "application/octet-stream"),
                          size=int(size) if isinstance(size, int) else 0, is_inline=bool(value.get("isInline")),
                          content_id=value.get("contentId") if isinstance(value.get("contentId"), str) else None)


class GraphActionsFactory:
    """``MessageActionsFactory`` for Outlook accounts (shares the sync factory's pooled session and root)."""

    def __init__(self, providers: GraphProviderFactory, token_provider: TokenProvider) -> None:
        self._providers = providers
        self._tokens = token_provider
        self._session = providers.new_session(16)

    def open_actions(self, account: Account) -> GraphActions:
        account_id = account.account_id

        def token(force_refresh: bool) -> str:
            return self._tokens.access_token(account_id, force_refresh=force_refresh)

        return GraphActions(_SharedClient(token, base_url=self._providers.base_url, session=self._session),
                            account_id)


class _SharedClient(GraphClient):
    """A GraphClient on the factory's pooled session (closing it is a no-op)."""

    def close(self) -> None:
        return None
