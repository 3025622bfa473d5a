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
  delete: ``DELETE`` (to Deleted Items, as Outlook does) or
  ``POST …/permanentDelete``.
* Each item carries its own ``Prefer: IdType="ImmutableId"``: headers of the
  batch request do not apply to its items, and without it the answer of a
  move would name the message by a REST id that changes with every move.
* Graph dispatches up to four items of a batch at once to the mailbox, and
  each counts against the mailbox's four concurrent requests: so batches
  are sent one at a time (one batch already fills the mailbox's slots), and
  items answered 429 / 503 / 504 (MailboxConcurrency, a sync call holding a
  slot) are sent again in the next batch after their ``Retry-After``, up to
  ``retry_rounds`` times or while the wait stays under ``max_wait_s``;
  past that the outcome carries the ``ProviderThrottled`` /
  ``ProviderUnavailable`` so the caller can try later.
* An action with updates and a move is two steps in that order (the PATCH
  round first, then the move round), as Outlook applies them.
* Idempotence: a PATCH to the values the message has is a no-op at Graph
  (no new change key), a move to the folder it is already in answers the
  message, and a DELETE or permanentDelete of a message that is not there
  any more (404) counts as done: a retried action answers as done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
IMMUTABLE = 'IdType="ImmutableId"'
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

    def apply(self, actions: Sequence[MessageAction]) -> list[ActionOutcome]:
        outcomes: dict[int, ActionOutcome] = {}
        messages: dict[int, Message] = {}
        # Round 1: updates; round 2: moves and deletes of what round 1 did not fail.
        updates = [_Step(n, "PATCH", f"me/messages/{_mid(a.message_id)}", _patch_body(a), "update")
                   for n, a in enumerate(actions) if a.updates and not a.delete]
        self._run(updates, actions, outcomes, messages)
        second: list[_Step] = []
        for n, action in enumerate(actions):
            if n in outcomes:
                continue
            if action.delete:
                if action.permanent:
                    second.append(_Step(n, "POST", f"me/messages/{_mid(action.message_id)}/permanentDelete", None,
                                        "delete"))
                else:
                    second.append(_Step(n, "DELETE", f"me/messages/{_mid(action.message_id)}", None, "delete"))
            elif action.destination is not None:
                second.append(_Step(n, "POST", f"me/messages/{_mid(action.message_id)}/move",
                                    {"destinationId": action.destination}, "move"))
        self._run(second, actions, outcomes, messages)
        for n, action in enumerate(actions):
            if n not in outcomes:   # updates only, and they worked
                message = messages.get(n)
                outcomes[n] = ActionOutcome(action=action, done=True, message_id=action.message_id,
                                            folder_id=message.folder_id if message else action.folder_id,
                                            message=message)
        return [outcomes[n] for n in range(len(actions))]

    def _run(self, steps: list[_Step], actions: Sequence[MessageAction], outcomes: dict[int, ActionOutcome],
             messages: dict[int, Message]) -> None:
        """Send ``steps`` in batches; record failures in ``outcomes`` and answered messages in ``messages``."""
        pending = list(steps)
        rounds = 0
        while pending:
            retry: list[_Step] = []
            wait = 0.0
            for start in range(0, len(pending), BATCH_LIMIT):
                chunk = pending[start:start + BATCH_LIMIT]
                try:
                    answers = self._batch(chunk)
                except (ProviderThrottled, ProviderUnavailable) as exc:
                    # The whole batch was refused: every item waits like a refused item.
                    answers = {str(i): (exc, None) for i in range(len(chunk))}
                except MailsyncError as exc:
                    for step in chunk:
                        outcomes[step.index] = ActionOutcome(action=actions[step.index], done=False, error=exc)
                    continue
                for position, step in enumerate(chunk):
                    error, body = answers.get(str(position), (MalformedResponse("Graph's batch left an item out"),
                                                              None))
                    action = actions[step.index]
                    if error is None:
                        if isinstance(body, dict) and body.get("id"):
                            message = map_message(body, self._account_id,
                                                  str(body.get("parentFolderId") or action.folder_id),
                                                  observed_ms=int(self._clock() * 1000))
                            messages[step.index] = message
                        if step.kind == "delete":
                            outcomes[step.index] = _deleted(action)
                        elif step.kind == "move":
                            moved = messages.get(step.index)
                            outcomes[step.index] = ActionOutcome(
                                action=action, done=True, message_id=action.message_id,
                                folder_id=moved.folder_id if moved else action.destination, message=moved)
                        continue
                    if step.kind == "delete" and isinstance(error, NotFound):
                        # Already gone: done (a retried delete), and said so (no trash copy to keep either).
                        outcomes[step.index] = _deleted(action, absent=True)
                    elif isinstance(error, (ProviderThrottled, ProviderUnavailable)):
                        retry.append(step)
                        wait = max(wait, error.retry_after_s or 0.0)
                    else:
                        outcomes[step.index] = ActionOutcome(action=action, done=False, error=error)
            rounds += 1
            if not retry:
                return
            if rounds > self._retry_rounds or wait > self._max_wait_s:
                error = ProviderThrottled("Graph kept refusing the action; try again later",
                                          retry_after_s=max(wait, 1.0))
                for step in retry:
                    outcomes[step.index] = ActionOutcome(action=actions[step.index], done=False, error=error)
                return
            self._sleep(wait or min(0.1 * 2 ** rounds, 2.0))
            pending = retry

    def _batch(self, chunk: list[_Step]) -> dict[str, tuple[MailsyncError | None, Any]]:
        requests = []
        for position, step in enumerate(chunk):
            item: dict[str, Any] = {"id": str(position), "method": step.method, "url": f"/{step.url}",
                                    "headers": {"Prefer": IMMUTABLE}}
            if step.body is not None:
                item["body"] = step.body
                item["headers"]["Content-Type"] = "application/json"
            requests.append(item)
        answer = self._client.request("POST", "$batch", json_body={"requests": requests})
        responses = answer.get("responses") if isinstance(answer, dict) else None
        if not isinstance(responses, list):
            raise MalformedResponse("Graph's batch answer has no responses array")
        found: dict[str, tuple[MailsyncError | None, Any]] = {}
        for response in responses:
            if not isinstance(response, dict) or not isinstance(response.get("status"), int):
                continue
            status, body = response["status"], response.get("body")
            headers = response.get("headers") or {}
            retry_after = next((str(v) for k, v in headers.items() if k.lower() == "retry-after"), None)
            error = None if 200 <= status < 300 else error_for_status(status, body, retry_after)
            found[str(response.get("id"))] = (error, body)
        return found

    def close(self) -> None:
        self._client.close()


def _deleted(action: MessageAction, *, absent: bool = False) -> ActionOutcome:
    # DELETE moves to Deleted Items at Graph; the delta of that folder brings it in. The store
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
