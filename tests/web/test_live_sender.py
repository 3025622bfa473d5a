"""Sending to the live page from inside a function: the SignalR REST API (mailsync.realtime.live_sender), and the
publisher the action functions use, which sends at once and leaves to the output binding only what failed.

The service is the devhost's Azure SignalR emulation (the path the real page takes, with the AccessKey the
web tests configure); the pages are SignalR clients of two accounts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from mailsync.errors import ConfigurationError, DependencyUnavailable
from mailsync.models import Message, MessagesChanged
from mailsync.realtime.live_sender import RestLiveSender, key_authorization, sender_from_settings
from mailsync.realtime.signalr_messages import TARGET_CHANGES, ImmediatePublisher
from tests.web.conftest import WebHost, web_host_fixture
from tests.web.test_negotiate import _connect, _next_invocation, negotiate

FUNCTIONS = ["oauth_start", "signalr_negotiate"]


web = web_host_fixture(FUNCTIONS)


def _row(account_id: str) -> Message:
    return Message(account_id=account_id, message_id="m1", folder_id="inbox", version=7, subject="hello",
                   is_read=True, received_at=datetime(2026, 12, 1, tzinfo=UTC))


def test_the_rest_sender_reaches_its_accounts_pages_only(web: WebHost) -> None:
    mine, token = web.create_account()
    other, other_token = web.create_account()
    info, other_info = negotiate(web, token).json(), negotiate(web, other_token).json()
    sender = sender_from_settings(web.settings)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            page, other_page = await _connect(session, info), await _connect(session, other_info)
            loop = asyncio.get_running_loop()
            # Sent from a worker's thread, as the action service does; the other account's message last.
            await loop.run_in_executor(None, sender.send, [
                {"userId": mine, "target": "messagesChanged", "arguments": [{"account_id": mine}]},
                {"userId": other, "target": "syncProgress", "arguments": [{"account_id": other}]}])
            got, other_got = await _next_invocation(page), await _next_invocation(other_page)
            await page.close()
            await other_page.close()
            return got, other_got

    with ThreadPoolExecutor(max_workers=1) as pool:       # Playwright's sync API may hold the loop
        got, other_got = pool.submit(asyncio.run, scenario()).result(timeout=60)
    assert got == {"type": 1, "target": "messagesChanged", "arguments": [{"account_id": mine}]}
    assert other_got["target"] == "syncProgress" and other_got["arguments"] == [{"account_id": other}]


def test_the_rest_sender_says_why_it_could_not_send(web: WebHost) -> None:
    endpoint = f"{web.host.base_url}/signalr"
    message = [{"userId": "acc1", "target": "messagesChanged", "arguments": []}]
    with pytest.raises(ConfigurationError, match="refused our credentials"):
        RestLiveSender(endpoint, "mailsync", key_authorization("not the key")).send(message)
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        RestLiveSender("http://127.0.0.1:9/signalr", "mailsync", key_authorization("k"), timeout_s=2).send(message)

    def no_token(_url: str) -> str:
        raise RuntimeError("the identity endpoint is down")

    with pytest.raises(DependencyUnavailable, match="no token"):
        RestLiveSender(endpoint, "mailsync", no_token).send(message)


class _Sender:
    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[Mapping[str, Any]] = []
        self.error = error

    def send(self, messages: Sequence[Mapping[str, Any]]) -> None:
        if self.error is not None:
            raise self.error
        self.sent.extend(messages)


def test_the_immediate_publisher_sends_at_once_and_leaves_the_binding_empty() -> None:
    sender = _Sender()
    events = ImmediatePublisher(sender)
    events.publish_changes(MessagesChanged(account_id="acc1", upserted=(_row("acc1"),)))
    events.publish_changes(MessagesChanged(account_id="acc1"))          # nothing to say: nothing sent
    (sent,) = sender.sent
    assert sent["userId"] == "acc1" and sent["target"] == TARGET_CHANGES
    assert [(r["message_id"], r["is_read"], r["version"]) for r in sent["arguments"][0]["upserted"]] == [
        ("m1", True, 7)]
    assert not events and events.messages() == []


def test_what_the_immediate_publisher_could_not_send_goes_to_the_output_binding() -> None:
    events = ImmediatePublisher(_Sender(DependencyUnavailable("SignalR service answered 503")))
    events.publish_changes(MessagesChanged(account_id="acc1", upserted=(_row("acc1"),)))
    events.publish_action_failures("acc1", [{"message_id": "m1", "code": "x", "message": "refused"}])
    assert events
    changes, failures = events.messages()
    assert changes["userId"] == "acc1" and changes["target"] == TARGET_CHANGES
    assert [r["message_id"] for r in changes["arguments"][0]["upserted"]] == ["m1"]
    assert failures["target"] == "actionsFailed"
