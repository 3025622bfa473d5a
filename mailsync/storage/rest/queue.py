"""One Azure Storage queue through its REST API: send, receive, delete, update, create.

The ``QueueClient`` calls this project makes on its hot path (a job sent per
change; the devhost's trigger receives and deletes it), with the SDK's
arguments, results and exceptions. Bodies are base64 both ways by default,
as ``mailsync.storage.connection`` configured the SDK clients to match the
Functions queue trigger (host.json ``messageEncoding: base64``):
``send_message`` takes text and sends its UTF-8 base64, received messages
carry the decoded bytes in ``content``. With ``base64_bodies=False`` (the
devhost, which decodes per ``messageEncoding`` itself) the text goes as it
is; either way ``text`` is the message text as stored. The messages' XML is a handful of
elements, read with one regular expression.
``tests/storage/test_rest_queue.py`` holds each call to the SDK's answers
against Azurite.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from html import escape, unescape
from urllib.parse import quote

from azure.core.exceptions import DecodeError

from mailsync.storage.rest.errors import refusal
from mailsync.storage.rest.service import ServiceClient

API_VERSION = "2021-02-12"
_HEADERS = {"x-ms-version": API_VERSION, "Accept": "application/xml"}
_MESSAGE = re.compile(rb"<QueueMessage>(.*?)</QueueMessage>", re.DOTALL)
_FIELD = re.compile(rb"<(\w+)>([^<]*)</\1>")


@dataclass(frozen=True)
class QueueMessage:
    """A message as the service answered it: ``text`` as stored, ``content`` decoded from base64 when received
    by a client that encodes bodies."""

    id: str
    pop_receipt: str | None = None
    text: str | None = None
    content: bytes | None = None
    dequeue_count: int | None = None
    inserted_on: datetime | None = None
    expires_on: datetime | None = None
    next_visible_on: datetime | None = None


class RestQueue:
    """Queue ``queue_name`` of the account behind ``service`` (a queue ``ServiceClient``)."""

    def __init__(self, service: ServiceClient, queue_name: str, *, base64_bodies: bool = True) -> None:
        self._service = service
        self.queue_name = queue_name
        self.base64_bodies = base64_bodies
        self._path = "/" + quote(queue_name, safe="")

    @property
    def url(self) -> str:
        return f"{self._service.endpoint.url}{self._path}"

    def close(self) -> None:
        self._service.close()

    def create_queue(self) -> None:
        """Create the queue; ``ResourceExistsError`` if it exists (an existing queue answers 204: no error)."""
        response = self._service.send("PUT", self._path, "creating the queue", headers=_HEADERS)
        if response.status not in (201, 204):
            raise refusal(response, f"creating queue {self.queue_name}")

    def send_message(self, content: str, *, visibility_timeout: int | None = None,
                     time_to_live: int | None = None) -> QueueMessage:
        """Send ``content`` (base64-encoded), invisible for ``visibility_timeout`` s (``time_to_live`` -1: forever)."""
        query: dict[str, str] = {}
        if visibility_timeout is not None:
            query["visibilitytimeout"] = str(int(visibility_timeout))
        if time_to_live is not None:
            query["messagettl"] = str(int(time_to_live))
        text = base64.b64encode(content.encode("utf-8")).decode("ascii") if self.base64_bodies else \
            escape(content, quote=False)
        body = (f"<?xml version='1.0' encoding='utf-8'?>\n<QueueMessage><MessageText>{text}</MessageText>"
                "</QueueMessage>").encode()
        response = self._service.send("POST", f"{self._path}/messages", "sending a message", query=query,
                                      body=body, headers={**_HEADERS, "Content-Type": "application/xml"})
        if response.status != 201:
            raise refusal(response, f"sending a message to queue {self.queue_name}")
        messages = _messages(response.body, decode=False)
        if len(messages) != 1:
            raise DecodeError("the queue's answer to a sent message holds no message")
        return messages[0]

    def receive_messages(self, *, max_messages: int = 1, visibility_timeout: int | None = None) -> list[QueueMessage]:
        """Up to ``max_messages`` (1-32) visible messages, hidden for ``visibility_timeout`` s."""
        query = {"numofmessages": str(max_messages)}
        if visibility_timeout is not None:
            query["visibilitytimeout"] = str(int(visibility_timeout))
        response = self._service.send("GET", f"{self._path}/messages", "receiving messages", query=query,
                                      headers=_HEADERS)
        if response.status != 200:
            raise refusal(response, f"receiving messages from queue {self.queue_name}")
        return _messages(response.body, decode=self.base64_bodies)

    def delete_message(self, message_id: str, pop_receipt: str) -> None:
        """Delete a received message; ``ResourceNotFoundError`` when it is gone or the pop receipt is stale."""
        response = self._service.send("DELETE", f"{self._path}/messages/{quote(message_id, safe='')}",
                                      "deleting a message", query={"popreceipt": pop_receipt}, headers=_HEADERS)
        if response.status != 204:
            raise refusal(response, f"deleting a message of queue {self.queue_name}")

    def update_message(self, message_id: str, pop_receipt: str, *, visibility_timeout: int) -> QueueMessage:
        """Hide a received message for ``visibility_timeout`` s more; returns its new pop receipt."""
        response = self._service.send("PUT", f"{self._path}/messages/{quote(message_id, safe='')}",
                                      "updating a message", headers=_HEADERS,
                                      query={"popreceipt": pop_receipt, "visibilitytimeout": str(visibility_timeout)})
        if response.status != 204:
            raise refusal(response, f"updating a message of queue {self.queue_name}")
        visible = response.headers.get("x-ms-time-next-visible")
        return QueueMessage(id=message_id, pop_receipt=response.headers.get("x-ms-popreceipt"),
                            next_visible_on=parsedate_to_datetime(visible) if visible else None)


def _messages(body: bytes, *, decode: bool) -> list[QueueMessage]:
    found: list[QueueMessage] = []
    for element in _MESSAGE.findall(body):
        fields = {name.decode(): unescape(value.decode("utf-8")) for name, value in _FIELD.findall(element)}
        if "MessageId" not in fields:
            raise DecodeError("a queue message without a MessageId")
        content = None
        if decode and "MessageText" in fields:
            try:
                content = base64.b64decode(fields["MessageText"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise DecodeError(f"message {fields['MessageId']} is not base64") from exc
        count = fields.get("DequeueCount")
        found.append(QueueMessage(
            id=fields["MessageId"], pop_receipt=fields.get("PopReceipt"), text=fields.get("MessageText"),
            content=content,
            dequeue_count=int(count) if count else None, inserted_on=_date(fields.get("InsertionTime")),
            expires_on=_date(fields.get("ExpirationTime")), next_visible_on=_date(fields.get("TimeNextVisible"))))
    return found


def _date(text: str | None) -> datetime | None:
    return parsedate_to_datetime(text) if text else None


