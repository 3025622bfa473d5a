"""Change-notification subscriptions over HTTP, with a real webhook receiver.

The receiver is a small aiohttp server on a free 127.0.0.1 port; each test
gets its own paths on it, so tests do not see each other's notifications.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from aiohttp import web

from graph_sandbox.config import SandboxConfig
from graph_sandbox.server import SandboxServer
from tests.graph_sandbox.signin import app_token, user_tokens

WAIT_S = 15.0


@dataclass
class Path:
    """How one receiver path behaves, and what it got."""

    echo: str = "exact"            # exact | wrong | status404 | slow
    fail_first: int = 0            # answer 500 to the first N notification POSTs
    slow_first: int = 0            # answer the first N notification POSTs after slow_s
    slow_s: float = 0.0
    refuse_subscription: str = ""  # answer 500 to every POST carrying this subscription's notifications
    validations: list[dict[str, str]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)     # every notification POST body
    attempts: int = 0

    @property
    def items(self) -> list[dict[str, Any]]:
        return [item for post in self.posts for item in post["value"]]


class Receiver:
    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def setup() -> None:
            app = web.Application()
            app.add_routes([web.post("/{name}", self._handle)])
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

        self._loop.run_until_complete(setup())
        ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        path = self.paths.get(request.match_info["name"])
        if path is None:
            return web.Response(status=404)
        token = request.query.get("validationToken")
        if token is not None:
            with self._cond:
                path.validations.append({"token": token, "content_type": request.headers.get("Content-Type", "")})
                self._cond.notify_all()
            if path.echo == "slow":
                await asyncio.sleep(2.0)
            if path.echo == "status404":
                return web.Response(status=404, text=token)
            if path.echo == "wrong":
                return web.Response(text=token.upper() + "x", content_type="text/plain")
            return web.Response(text=token, content_type="text/plain")
        body = await request.json()
        with self._cond:
            path.attempts += 1
            attempt = path.attempts
        if attempt <= path.slow_first:
            await asyncio.sleep(path.slow_s)
        with self._cond:
            path.posts.append(body)
            self._cond.notify_all()
        if attempt <= path.fail_first:
            return web.Response(status=500)
        if path.refuse_subscription and any(item.get("subscriptionId") == path.refuse_subscription
                                            for item in body.get("value", [])):
            return web.Response(status=500)
        return web.Response(status=202)

    def new(self, **behaviour: Any) -> tuple[str, Path]:
        name = uuid.uuid4().hex[:12]
        self.paths[name] = Path(**behaviour)
        return f"{self.base}/{name}", self.paths[name]

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=WAIT_S):
                raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    config = SandboxConfig(users=2, messages_per_user=6, validation_timeout_s=0.5, notification_timeout_s=0.5,
                           notification_retry_base_s=0.05, notification_retry_cap_s=0.2,
                           allow_http_loopback_webhooks=True)
    sandbox = SandboxServer(config)
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def url(server: SandboxServer) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def user(server: SandboxServer) -> Any:
    return sorted(server.state.users.values(), key=lambda u: u.mail)[0]


@pytest.fixture(scope="module")
def other(server: SandboxServer) -> Any:
    return sorted(server.state.users.values(), key=lambda u: u.mail)[1]


@pytest.fixture
def token(url: str, user: Any) -> str:
    return str(user_tokens(url, user.mail)[0]["access_token"])


@pytest.fixture(autouse=True)
def no_faults(url: str) -> Iterator[None]:
    yield
    requests.put(f"{url}/sandbox/faults", json={"profile": "none"}, timeout=10).raise_for_status()


def sandbox_now(url: str) -> datetime:
    return datetime.fromisoformat(requests.get(f"{url}/sandbox/clock", timeout=10).json()["now"])


def expires_in(url: str, minutes: float) -> str:
    return (sandbox_now(url) + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def graph(url: str, token: str, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> requests.Response:
    return requests.request(method, f"{url}/v1.0/{path}", json=body, timeout=15,
                            headers={"Authorization": f"Bearer {token}", **(headers or {})})


def subscribe(url: str, token: str, notification_url: str, *, resource: str = "me/messages",
              change_type: str = "created,updated,deleted", minutes: float = 60, lifecycle_url: str | None = None,
              client_state: str | None = "s3cret", headers: dict[str, str] | None = None,
              **extra: Any) -> requests.Response:
    body: dict[str, Any] = {"changeType": change_type, "notificationUrl": notification_url, "resource": resource,
                            "expirationDateTime": expires_in(url, minutes), **extra}
    if client_state is not None:
        body["clientState"] = client_state
    if lifecycle_url is not None:
        body["lifecycleNotificationUrl"] = lifecycle_url
    return graph(url, token, "POST", "subscriptions", body, headers)


def graph_error(response: requests.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def inbox_message(url: str, token: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    page = graph(url, token, "GET", "me/mailFolders/inbox/messages?$top=1&$select=id,subject", headers=headers)
    assert page.status_code == 200, page.text
    return dict(page.json()["value"][0])


def deliver(url: str, user: Any, count: int = 1) -> list[dict[str, str]]:
    response = requests.post(f"{url}/sandbox/mailboxes/{user.id}/deliver", json={"count": count}, timeout=10)
    assert response.status_code == 200, response.text
    return list(response.json()["delivered"])


def admin_subscriptions(url: str) -> dict[str, Any]:
    return dict(requests.get(f"{url}/sandbox/subscriptions", timeout=10).json())


# -- creation: the validation handshake -----------------------------------------------


def test_creation_validates_both_urls_then_returns_the_subscription(
        url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    life, life_path = receiver.new()
    response = subscribe(url, token, hook + "?tag=a b", lifecycle_url=life, change_type="deleted,created")
    assert response.status_code == 201, response.text
    sub = response.json()
    assert sub["changeType"] == "created,deleted"
    assert sub["notificationUrl"] == hook + "?tag=a b"
    assert sub["lifecycleNotificationUrl"] == life
    assert sub["clientState"] == "s3cret"
    assert sub["resource"] == "me/messages"
    assert sub["creatorId"] == user.id
    assert sub["applicationId"]
    assert sub["expirationDateTime"].endswith("Z")
    uuid.UUID(sub["id"])
    # Graph's handshake: a POST with ?validationToken=... as text/plain, to each URL once.
    assert len(path.validations) == 1 and len(life_path.validations) == 1
    assert path.validations[0]["token"].startswith("Validation: Testing client application reachability")
    assert path.validations[0]["content_type"].startswith("text/plain")
    listed = graph(url, token, "GET", "subscriptions").json()["value"]
    assert sub["id"] in {s["id"] for s in listed}
    assert graph(url, token, "GET", f"subscriptions/{sub['id']}").json()["id"] == sub["id"]


@pytest.mark.parametrize(("behaviour", "code", "message"), [
    ({"echo": "wrong"}, "ValidationError", "must exactly match"),
    ({"echo": "status404"}, "ValidationError", "must respond with 200 OK"),
    ({"echo": "slow"}, "InvalidRequest", "timed out"),
])
def test_creation_fails_when_the_endpoint_does_not_echo(
        url: str, token: str, receiver: Receiver, behaviour: dict[str, str], code: str, message: str) -> None:
    hook, path = receiver.new(**behaviour)
    before = {s["id"] for s in admin_subscriptions(url)["value"]}
    response = subscribe(url, token, hook)
    assert message in graph_error(response, 400, code)
    assert len(path.validations) == 1
    assert {s["id"] for s in admin_subscriptions(url)["value"]} == before


def test_creation_fails_when_the_endpoint_is_unreachable(url: str, token: str) -> None:
    response = subscribe(url, token, "http://127.0.0.1:9/nothing-listens-here")
    graph_error(response, 400, "ValidationError")


def test_http_webhooks_need_the_loopback_option(url: str, token: str, receiver: Receiver) -> None:
    # Graph calls https endpoints only. This server has allow_http_loopback_webhooks,
    # which admits http on loopback and nothing else.
    hook, path = receiver.new()
    elsewhere = "http://example.com/hook"
    assert "https" in graph_error(subscribe(url, token, elsewhere), 400, "ValidationError")
    assert "https" in graph_error(subscribe(url, token, hook, lifecycle_url=elsewhere), 400, "ValidationError")
    assert path.validations == []
    strict = SandboxServer(SandboxConfig(users=1, messages_per_user=1))   # the default: https only
    try:
        base = strict.start()
        strict_user = next(iter(strict.state.users.values()))
        strict_token = str(user_tokens(base, strict_user.mail)[0]["access_token"])
        message = graph_error(subscribe(base, strict_token, hook), 400, "ValidationError")
        assert "--allow-http-loopback-webhooks" in message
        assert path.validations == []
    finally:
        strict.stop()


def test_creation_fails_when_only_the_lifecycle_url_does_not_echo(url: str, token: str, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    life, life_path = receiver.new(echo="wrong")
    graph_error(subscribe(url, token, hook, lifecycle_url=life), 400, "ValidationError")
    assert len(life_path.validations) == 1


# -- creation: bad requests --------------------------------------------------------------


def test_a_short_expiration_is_raised_to_45_minutes(url: str, token: str, receiver: Receiver) -> None:
    # Outlook does not refuse a lifetime under its minimum; it grants 45 minutes.
    hook, _ = receiver.new()
    before = sandbox_now(url)
    sub = subscribe(url, token, hook, minutes=5).json()
    granted = datetime.fromisoformat(sub["expirationDateTime"][:26] + "+00:00")
    assert before + timedelta(minutes=45) <= granted <= sandbox_now(url) + timedelta(minutes=45, seconds=1)
    renewed = graph(url, token, "PATCH", f"subscriptions/{sub['id']}", {"expirationDateTime": expires_in(url, 1)})
    assert renewed.status_code == 200, renewed.text
    again = datetime.fromisoformat(renewed.json()["expirationDateTime"][:26] + "+00:00")
    assert again >= granted


def test_expiration_is_limited_to_4230_minutes(url: str, token: str, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    message = graph_error(subscribe(url, token, hook, minutes=4231), 400, "ExtensionError")
    assert message == "Subscription expiration can only be 4230 minutes in the future."
    assert subscribe(url, token, hook, minutes=4229).status_code == 201
    graph_error(subscribe(url, token, hook, minutes=-1), 400, "InvalidRequest")


@pytest.mark.parametrize(("change", "status", "code"), [
    ({"client_state": "x" * 129}, 400, "InvalidRequest"),
    ({"change_type": "created,renamed"}, 400, "InvalidRequest"),
    ({"resource": "me/events"}, 400, "InvalidRequest"),
    ({"resource": "me/mailFolders('no-such-folder')/messages"}, 404, "ErrorItemNotFound"),
    ({"includeResourceData": True}, 400, "InvalidRequest"),
])
def test_bad_subscription_requests(url: str, token: str, receiver: Receiver, change: dict[str, Any], status: int,
                                   code: str) -> None:
    hook, path = receiver.new()
    graph_error(subscribe(url, token, hook, **change), status, code)
    assert path.validations == []  # refused before any handshake


def test_client_state_of_128_characters_is_accepted(url: str, token: str, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    assert subscribe(url, token, hook, client_state="c" * 128).status_code == 201


def test_a_user_cannot_subscribe_to_another_mailbox(url: str, token: str, other: Any, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    graph_error(subscribe(url, token, hook, resource=f"users/{other.id}/messages"), 403, "ExtensionError")


def test_me_needs_a_delegated_token(url: str, server: SandboxServer, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    app = app_token(url, server.state.tenant_id)
    graph_error(subscribe(url, app, hook), 400, "BadRequest")


def test_missing_token_is_401(url: str) -> None:
    response = requests.post(f"{url}/v1.0/subscriptions", json={}, timeout=10)
    graph_error(response, 401, "InvalidAuthenticationToken")


# -- notifications ---------------------------------------------------------------------------


def test_created_updated_moved_deleted_are_notified(url: str, token: str, user: Any, server: SandboxServer,
                                                    receiver: Receiver) -> None:
    hook, path = receiver.new()
    sub = subscribe(url, token, hook).json()

    delivered = deliver(url, user)[0]
    receiver.wait(lambda: len(path.items) >= 1, "created")
    created = path.items[0]
    assert created["changeType"] == "created"
    assert created["subscriptionId"] == sub["id"]
    assert created["clientState"] == "s3cret"
    assert created["tenantId"] == server.state.tenant_id
    assert created["subscriptionExpirationDateTime"] == sub["expirationDateTime"]
    assert created["resource"] == f"Users/{user.id}/Messages/{delivered['restId']}"
    assert created["resourceData"]["id"] == delivered["restId"]
    assert created["resourceData"]["@odata.type"] == "#Microsoft.Graph.Message"
    assert created["resourceData"]["@odata.id"] == created["resource"]
    uuid.UUID(created["id"])       # each change notification has its own id
    message_id = delivered["restId"]
    assert graph(url, token, "GET", f"me/messages/{message_id}").status_code == 200

    assert graph(url, token, "PATCH", f"me/messages/{message_id}", {"isRead": True}).status_code == 200
    receiver.wait(lambda: len(path.items) >= 2, "updated")
    assert (path.items[1]["changeType"], path.items[1]["resourceData"]["id"]) == ("updated", message_id)

    moved = graph(url, token, "POST", f"me/messages/{message_id}/move", {"destinationId": "archive"})
    assert moved.status_code == 201
    new_id = moved.json()["id"]
    assert new_id != message_id
    receiver.wait(lambda: len(path.items) >= 4, "move")
    assert [(n["changeType"], n["resourceData"]["id"]) for n in path.items[2:4]] == [
        ("deleted", message_id), ("created", new_id)]

    assert graph(url, token, "DELETE", f"me/messages/{new_id}").status_code == 204  # to Deleted Items
    receiver.wait(lambda: len(path.items) >= 6, "delete")
    assert [n["changeType"] for n in path.items[4:6]] == ["deleted", "created"]
    in_trash = path.items[5]["resourceData"]["id"]
    assert graph(url, token, "DELETE", f"me/messages/{in_trash}").status_code == 204  # for good
    receiver.wait(lambda: len(path.items) >= 7, "hard delete")
    assert (path.items[6]["changeType"], path.items[6]["resourceData"]["id"]) == ("deleted", in_trash)
    assert "@odata.etag" not in path.items[6]["resourceData"]
    assert len({n["id"] for n in path.items}) == 7


def test_mail_folders_subscription_notifies_folder_changes(url: str, token: str, user: Any,
                                                           receiver: Receiver) -> None:
    hook, path = receiver.new()
    sub = subscribe(url, token, hook, resource="me/mailFolders").json()
    assert sub["resource"] == "me/mailFolders"
    folder = graph(url, token, "POST", "me/mailFolders", {"displayName": f"Trips {uuid.uuid4().hex[:6]}"}).json()
    receiver.wait(lambda: len(path.items) >= 1, "created")
    created = path.items[0]
    assert (created["changeType"], created["resourceData"]["id"]) == ("created", folder["id"])
    assert created["resource"] == f"Users/{user.id}/MailFolders/{folder['id']}"
    assert created["resourceData"]["@odata.type"] == "#Microsoft.Graph.MailFolder"
    assert created["clientState"] == "s3cret"
    uuid.UUID(created["id"])
    assert graph(url, token, "PATCH", f"me/mailFolders/{folder['id']}",
                 {"displayName": f"Travel {uuid.uuid4().hex[:6]}"}).status_code == 200
    receiver.wait(lambda: len(path.items) >= 2, "renamed")
    assert graph(url, token, "POST", f"me/mailFolders/{folder['id']}/move",
                 {"destinationId": "inbox"}).status_code == 201
    receiver.wait(lambda: len(path.items) >= 3, "moved")
    assert [(n["changeType"], n["resourceData"]["id"]) for n in path.items[1:3]] == [
        ("updated", folder["id"]), ("updated", folder["id"])]
    # Message changes are not folder changes: nothing for new mail.
    deliver(url, user)
    assert graph(url, token, "DELETE", f"me/mailFolders/{folder['id']}").status_code == 204  # to Deleted Items
    receiver.wait(lambda: len(path.items) >= 4, "deleted (moved to Deleted Items)")
    assert all(n["resourceData"]["@odata.type"] == "#Microsoft.Graph.MailFolder" for n in path.items)
    assert all(n["resourceData"]["id"] == folder["id"] for n in path.items)


def test_folder_subscription_sees_only_its_folder(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    assert subscribe(url, token, hook, resource="me/mailFolders('Inbox')/messages").status_code == 201
    message_id = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: len(path.items) >= 1, "created in inbox")
    graph(url, token, "POST", f"me/messages/{message_id}/move", {"destinationId": "archive"}).raise_for_status()
    receiver.wait(lambda: len(path.items) >= 2, "moved out")
    deliver(url, user)
    receiver.wait(lambda: len(path.items) >= 3, "next inbox message")
    # The "created" in Archive never reached the Inbox subscription.
    assert [n["changeType"] for n in path.items] == ["created", "deleted", "created"]
    assert path.items[1]["resourceData"]["id"] == message_id


def test_immutable_ids_when_subscribed_with_the_prefer_header(url: str, token: str, user: Any,
                                                              receiver: Receiver) -> None:
    hook, path = receiver.new()
    prefer = {"Prefer": 'IdType="ImmutableId"'}
    assert subscribe(url, token, hook, change_type="created,deleted", headers=prefer).status_code == 201
    immutable_id = deliver(url, user)[0]["id"]
    receiver.wait(lambda: len(path.items) >= 1, "created")
    graph(url, token, "POST", f"me/messages/{immutable_id}/move", {"destinationId": "archive"},
          headers=prefer).raise_for_status()
    receiver.wait(lambda: len(path.items) >= 3, "move")
    assert {n["resourceData"]["id"] for n in path.items} == {immutable_id}


def test_app_subscription_to_a_users_messages(url: str, server: SandboxServer, other: Any,
                                              receiver: Receiver) -> None:
    hook, path = receiver.new()
    app = app_token(url, server.state.tenant_id)
    response = subscribe(url, app, hook, resource=f"users/{other.mail}/messages", change_type="created")
    assert response.status_code == 201, response.text
    deliver(url, other)
    receiver.wait(lambda: len(path.items) >= 1, "created")
    assert path.items[0]["resource"].startswith(f"Users/{other.id}/Messages/")


def test_changes_made_together_arrive_in_one_batch(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    subscribe(url, token, hook, change_type="created").raise_for_status()
    deliver(url, user, count=3)
    receiver.wait(lambda: len(path.items) >= 3, "three created")
    assert len(path.posts) == 1 and len(path.posts[0]["value"]) == 3


def test_failing_endpoint_is_retried_until_it_accepts(url: str, token: str, user: Any, receiver: Receiver) -> None:
    before = admin_subscriptions(url)["delivery"]   # the sandbox is shared by this module's tests
    hook, path = receiver.new(fail_first=3)
    subscribe(url, token, hook, change_type="created").raise_for_status()
    message_id = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: path.attempts >= 4, "the fourth attempt")
    assert len(path.posts) == 4
    assert all(post["value"][0]["resourceData"]["id"] == message_id for post in path.posts)
    assert admin_subscriptions(url)["delivery"]["failed_posts"] >= 3
    receiver.wait(lambda: admin_subscriptions(url)["delivery"]["delivered"] > before["delivered"], "the delivery")
    stats = {k: v - before[k] for k, v in admin_subscriptions(url)["delivery"].items()}
    # Where the time went (benchmarks read these; other tests' deliveries may still add to them).
    assert stats["posts"] >= 4 and stats["post_ms"] > 0 and stats["delivered_wait_ms"] > 0


def test_each_subscription_is_delivered_on_its_own(url: str, token: str, user: Any, other: Any,
                                                   server: SandboxServer, receiver: Receiver) -> None:
    # Two mailboxes, one webhook URL: a POST carries one subscription's notifications, and
    # one subscription's failing POSTs (retried with back-off) do not hold the other's back.
    hook, path = receiver.new()
    refused = subscribe(url, token, hook, change_type="created").json()["id"]
    path.refuse_subscription = refused
    app = app_token(url, server.state.tenant_id)
    subscribe(url, app, hook, resource=f"users/{other.mail}/messages", change_type="created").raise_for_status()
    deliver(url, user)
    receiver.wait(lambda: path.attempts >= 2, "the refused subscription's retry")
    delivered = deliver(url, other, count=2)
    receiver.wait(lambda: sum(1 for item in path.items if item["subscriptionId"] != refused) >= 2,
                  "the other subscription's notifications")
    assert all(len({item["subscriptionId"] for item in post["value"]}) == 1 for post in path.posts)
    assert {item["resourceData"]["id"] for item in path.items if item["subscriptionId"] != refused} == \
        {m["restId"] for m in delivered}


def test_slow_endpoint_is_retried(url: str, token: str, user: Any, receiver: Receiver) -> None:
    # Graph gives up on an answer after 3 s (0.5 s here) and sends the batch again.
    hook, path = receiver.new(slow_first=1, slow_s=1.5)
    subscribe(url, token, hook, change_type="created").raise_for_status()
    message_id = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: len(path.posts) >= 2, "the retry after a slow answer")
    assert [p["value"][0]["resourceData"]["id"] for p in path.posts[:2]] == [message_id, message_id]


def test_deleted_subscription_stops_notifying(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    sub = subscribe(url, token, hook, change_type="created").json()
    assert graph(url, token, "DELETE", f"subscriptions/{sub['id']}").status_code == 204
    graph_error(graph(url, token, "GET", f"subscriptions/{sub['id']}"), 404, "ResourceNotFound")
    # A second subscription on another path proves delivery happened meanwhile.
    hook2, path2 = receiver.new()
    subscribe(url, token, hook2, change_type="created").raise_for_status()
    deliver(url, user)
    receiver.wait(lambda: len(path2.items) >= 1, "the live subscription")
    assert path.items == []


def test_renewal_and_its_limit(url: str, token: str, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    sub = subscribe(url, token, hook, minutes=30).json()
    renewed = graph(url, token, "PATCH", f"subscriptions/{sub['id']}",
                    {"expirationDateTime": expires_in(url, 4000)})
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["expirationDateTime"] > sub["expirationDateTime"]
    too_far = graph(url, token, "PATCH", f"subscriptions/{sub['id']}", {"expirationDateTime": expires_in(url, 5000)})
    graph_error(too_far, 400, "ExtensionError")
    graph_error(graph(url, token, "PATCH", f"subscriptions/{sub['id']}", {"resource": "me/events"}), 400,
                "InvalidRequest")


def test_fault_plan_drops_or_duplicates_notifications(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    subscribe(url, token, hook, change_type="created").raise_for_status()
    requests.put(f"{url}/sandbox/faults", json={"profile": "none", "overrides": {"notify_duplicate": 1.0}},
                 timeout=10).raise_for_status()
    message_id = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: len(path.items) >= 2, "the duplicate")
    assert [n["resourceData"]["id"] for n in path.items] == [message_id, message_id]
    requests.put(f"{url}/sandbox/faults", json={"profile": "none", "overrides": {"notify_drop": 1.0}},
                 timeout=10).raise_for_status()
    dropped_before = admin_subscriptions(url)["delivery"]["dropped"]
    deliver(url, user)
    assert admin_subscriptions(url)["delivery"]["dropped"] > dropped_before
    requests.put(f"{url}/sandbox/faults", json={"profile": "none"}, timeout=10).raise_for_status()
    last_id = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: len(path.items) >= 3, "the next notification")
    # The dropped one never comes: the next thing on the wire is the following change.
    assert [n["resourceData"]["id"] for n in path.items] == [message_id, message_id, last_id]


def test_fault_plan_delays_and_reorders_notifications(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    subscribe(url, token, hook, change_type="created").raise_for_status()
    requests.put(f"{url}/sandbox/faults", timeout=10, json={
        "profile": "none", "overrides": {"notify_delay": 1.0, "notify_delay_s": 0.2}}).raise_for_status()
    delayed_before = admin_subscriptions(url)["delivery"]["delayed"]
    late_id = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: len(path.items) >= 1, "the delayed notification")
    assert path.items[0]["resourceData"]["id"] == late_id
    assert admin_subscriptions(url)["delivery"]["delayed"] > delayed_before

    requests.put(f"{url}/sandbox/faults", timeout=10, json={
        "profile": "none", "seed": 7, "overrides": {"notify_reorder": 1.0}}).raise_for_status()
    reordered_before = admin_subscriptions(url)["delivery"]["reordered"]
    ids = [m["restId"] for m in deliver(url, user, count=6)]
    receiver.wait(lambda: len(path.items) >= 7, "the reordered batch")
    got = [n["resourceData"]["id"] for n in path.items[1:]]
    assert sorted(got) == sorted(ids)
    assert admin_subscriptions(url)["delivery"]["reordered"] > reordered_before


# -- lifecycle --------------------------------------------------------------------------------


def advance(url: str, seconds: float) -> None:
    requests.post(f"{url}/sandbox/clock", json={"advance_s": seconds}, timeout=10).raise_for_status()


def test_reauthorization_challenge_holds_notifications_until_answered(url: str, token: str, user: Any,
                                                                      receiver: Receiver) -> None:
    hook, path = receiver.new()
    life, life_path = receiver.new()
    sub = subscribe(url, token, hook, lifecycle_url=life, change_type="created", minutes=60).json()
    advance(url, 46 * 60)                    # now inside the 15 minutes before expiry
    receiver.wait(lambda: len(life_path.items) >= 1, "reauthorizationRequired")
    event = life_path.items[0]
    assert event["lifecycleEvent"] == "reauthorizationRequired"
    assert event["subscriptionId"] == sub["id"] and event["clientState"] == "s3cret"
    assert "resource" not in event
    # Unanswered: delivery pauses, and the challenge comes again a few minutes later.
    first = deliver(url, user)[0]["restId"]
    advance(url, 180)
    receiver.wait(lambda: len(life_path.items) >= 2, "the repeated reauthorizationRequired")
    assert life_path.items[1]["lifecycleEvent"] == "reauthorizationRequired"
    assert path.items == []
    assert [s["held"] for s in admin_subscriptions(url)["value"] if s["id"] == sub["id"]] == [1]
    # Answering releases what was held, and the events stop.
    assert graph(url, token, "POST", f"subscriptions/{sub['id']}/reauthorize").status_code == 204
    receiver.wait(lambda: len(path.items) >= 1, "the held notification")
    assert path.items[0]["resourceData"]["id"] == first
    second = deliver(url, user)[0]["restId"]
    receiver.wait(lambda: len(path.items) >= 2, "live delivery again")
    assert path.items[1]["resourceData"]["id"] == second
    advance(url, 200)
    threading.Event().wait(0.5)              # housekeeping runs every 0.1 s
    assert len(life_path.items) == 2


def test_renewing_answers_an_on_demand_challenge(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    life, life_path = receiver.new()
    sub = subscribe(url, token, hook, lifecycle_url=life, change_type="created", minutes=600).json()
    response = requests.post(f"{url}/sandbox/subscriptions/{sub['id']}/lifecycle",
                             json={"event": "reauthorizationRequired"}, timeout=10)
    assert response.status_code == 202
    receiver.wait(lambda: len(life_path.items) >= 1, "reauthorizationRequired")
    held = deliver(url, user)[0]["restId"]
    threading.Event().wait(0.3)
    assert path.items == []
    renewed = graph(url, token, "PATCH", f"subscriptions/{sub['id']}", {"expirationDateTime": expires_in(url, 900)})
    assert renewed.status_code == 200
    receiver.wait(lambda: len(path.items) >= 1, "the held notification")
    assert path.items[0]["resourceData"]["id"] == held


def test_expired_subscription_is_gone(url: str, token: str, user: Any, receiver: Receiver) -> None:
    hook, path = receiver.new()
    sub = subscribe(url, token, hook, change_type="created", minutes=4229).json()
    requests.post(f"{url}/sandbox/clock", json={"advance_s": 4230 * 60}, timeout=10).raise_for_status()
    fresh = user_tokens(url, user.mail)[0]["access_token"]
    for _ in range(100):   # the housekeeping loop runs every 0.1 s
        if sub["id"] not in {s["id"] for s in admin_subscriptions(url)["value"]}:
            break
        threading.Event().wait(0.1)
    graph_error(graph(url, fresh, "GET", f"subscriptions/{sub['id']}"), 404, "ResourceNotFound")
    hook2, path2 = receiver.new()
    subscribe(url, fresh, hook2, change_type="created").raise_for_status()
    deliver(url, user)
    receiver.wait(lambda: len(path2.items) >= 1, "the live subscription")
    assert path.items == []


def test_revoked_grant_removes_the_subscription(url: str, server: SandboxServer, other: Any,
                                               receiver: Receiver) -> None:
    victim_token = user_tokens(url, other.mail)[0]["access_token"]
    hook, _ = receiver.new()
    life, life_path = receiver.new()
    sub = subscribe(url, victim_token, hook, lifecycle_url=life, minutes=600).json()
    requests.post(f"{url}/sandbox/users/{other.id}/revoke-grant", json={}, timeout=10).raise_for_status()
    try:
        receiver.wait(lambda: len(life_path.items) >= 1, "subscriptionRemoved")
        assert life_path.items[0]["lifecycleEvent"] == "subscriptionRemoved"
        assert life_path.items[0]["subscriptionId"] == sub["id"]
        assert sub["id"] not in {s["id"] for s in admin_subscriptions(url)["value"]}
    finally:
        requests.post(f"{url}/sandbox/users/{other.id}/restore-grant", json={}, timeout=10).raise_for_status()


def test_missed_lifecycle_event_replaces_lost_notifications(url: str, token: str, user: Any,
                                                            receiver: Receiver) -> None:
    hook, path = receiver.new()
    life, life_path = receiver.new()
    sub = subscribe(url, token, hook, lifecycle_url=life, change_type="created", minutes=600).json()
    requests.put(f"{url}/sandbox/faults", json={"profile": "none", "overrides": {"lifecycle_missed": 1.0}},
                 timeout=10).raise_for_status()
    deliver(url, user)
    receiver.wait(lambda: len(life_path.items) >= 1, "missed")
    assert life_path.items[0]["lifecycleEvent"] == "missed"
    assert life_path.items[0]["subscriptionId"] == sub["id"]
    assert path.items == []


def test_lifecycle_event_on_demand(url: str, token: str, receiver: Receiver) -> None:
    hook, _ = receiver.new()
    life, life_path = receiver.new()
    sub = subscribe(url, token, hook, lifecycle_url=life, minutes=600).json()
    response = requests.post(f"{url}/sandbox/subscriptions/{sub['id']}/lifecycle",
                             json={"event": "subscriptionRemoved"}, timeout=10)
    assert response.status_code == 202
    receiver.wait(lambda: len(life_path.items) >= 1, "subscriptionRemoved")
    graph_error(graph(url, token, "GET", f"subscriptions/{sub['id']}"), 404, "ResourceNotFound")


# -- change notifications with resource data (rich notifications) -------------------------------


def _certificate(bits: int = 2048) -> tuple[Any, str]:
    """A self-signed certificate (Graph does not check the issuer) and its private key: (key, base64 DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox test")])
    start = datetime(2025, 1, 1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + timedelta(days=3650)).sign(key, hashes.SHA256()))
    return key, base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _decrypt(key: Any, content: dict[str, Any]) -> dict[str, Any]:
    """Microsoft's documented steps: RSA-OAEP (SHA-1) for the key, HMAC-SHA256 check, AES-CBC with IV = key[:16]."""
    from cryptography.hazmat.primitives import hashes, padding
    from cryptography.hazmat.primitives.asymmetric import padding as asymmetric
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    symmetric = key.decrypt(base64.b64decode(content["dataKey"]), asymmetric.OAEP(
        mgf=asymmetric.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    data = base64.b64decode(content["data"])
    expected = hmac.new(symmetric, data, hashlib.sha256).digest()
    assert hmac.compare_digest(expected, base64.b64decode(content["dataSignature"]))
    decryptor = Cipher(algorithms.AES(symmetric), modes.CBC(symmetric[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(data) + decryptor.finalize()) + unpadder.finalize()
    return dict(json.loads(plain))


def _token_claims(url: str, token: str) -> dict[str, Any]:
    """A validation token checked against the identity platform's published keys (RS256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    header, claims, signature = token.split(".")
    kid = json.loads(unb64(header))["kid"]
    keys = requests.get(f"{url}/common/discovery/v2.0/keys", timeout=10).json()["keys"]
    jwk = next(k for k in keys if k["kid"] == kid)
    public = rsa.RSAPublicNumbers(int.from_bytes(unb64(jwk["e"]), "big"),
                                  int.from_bytes(unb64(jwk["n"]), "big")).public_key()
    public.verify(unb64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return dict(json.loads(unb64(claims)))


def test_rich_notifications_carry_the_selected_properties_encrypted(
        url: str, token: str, user: Any, server: SandboxServer, receiver: Receiver) -> None:
    key, certificate = _certificate()
    hook, path = receiver.new()
    life, _ = receiver.new()
    response = subscribe(url, token, hook, resource="me/messages?$select=parentFolderId,Subject",
                         lifecycle_url=life, includeResourceData=True, encryptionCertificate=certificate,
                         encryptionCertificateId="cert-1")
    assert response.status_code == 201, response.text
    sub = response.json()
    assert (sub["includeResourceData"], sub["encryptionCertificateId"]) == (True, "cert-1")
    assert sub["encryptionCertificate"] == certificate

    delivered = deliver(url, user)[0]
    receiver.wait(lambda: len(path.items) >= 1, "created")
    post = path.posts[0]
    item = post["value"][0]
    content = item["encryptedContent"]
    assert content["encryptionCertificateId"] == "cert-1"
    from cryptography import x509
    der = base64.b64decode(certificate)
    assert content["encryptionCertificateThumbprint"] == hashlib.sha1(der).hexdigest().upper()
    x509.load_der_x509_certificate(der)
    data = _decrypt(key, content)
    inbox = graph(url, token, "GET", "me/mailFolders/inbox?$select=id").json()["id"]
    assert data["parentFolderId"] == inbox
    assert data["id"] == item["resourceData"]["id"] == delivered["restId"]
    assert "subject" in data and "body" not in data
    # One validation token per (app, tenant): signed by the identity platform, for our app, from Graph's publisher.
    assert len(post["validationTokens"]) == 1
    claims = _token_claims(url, post["validationTokens"][0])
    assert claims["aud"] == sub["applicationId"]
    assert claims["appid"] == "0bf30f3b-4a52-48df-9a82-234910c4a086"
    assert claims["iss"] == f"https://sts.windows.net/{server.state.tenant_id}/"
    assert claims["tid"] == server.state.tenant_id and claims["exp"] > claims["nbf"]

    moved = graph(url, token, "POST", f"me/messages/{delivered['restId']}/move", {"destinationId": "archive"})
    assert moved.status_code == 201
    receiver.wait(lambda: len(path.items) >= 3, "move")
    gone, arrived = path.items[1], path.items[2]
    assert gone["changeType"] == "deleted" and "encryptedContent" not in gone    # nothing left to show
    assert arrived["changeType"] == "created"
    assert _decrypt(key, arrived["encryptedContent"])["parentFolderId"] == moved.json()["parentFolderId"]

    # Key rotation: a PATCH gives the subscription a new certificate; later notifications use it.
    new_key, new_certificate = _certificate()
    rotated = graph(url, token, "PATCH", f"subscriptions/{sub['id']}",
                    {"encryptionCertificate": new_certificate, "encryptionCertificateId": "cert-2"})
    assert rotated.status_code == 200, rotated.text
    assert graph(url, token, "PATCH", f"me/messages/{moved.json()['id']}", {"isRead": True}).status_code == 200
    receiver.wait(lambda: len(path.items) >= 4, "updated")
    assert path.items[3]["encryptedContent"]["encryptionCertificateId"] == "cert-2"
    assert _decrypt(new_key, path.items[3]["encryptedContent"])["parentFolderId"] == moved.json()["parentFolderId"]


def test_rich_notifications_carry_exactly_the_selected_list_properties_as_they_were_at_the_change(
        url: str, token: str, user: Any, receiver: Receiver) -> None:
    """The product's selection (every list property, mailsync.monitoring.resource_data.MESSAGE_SELECT): the data
    holds those, the id and the OData annotations, nothing else (no body), with the values of the change
    it reports, not of a later one."""
    key, certificate = _certificate()
    hook, path = receiver.new()
    life, _ = receiver.new()
    select = ("parentFolderId,subject,from,toRecipients,ccRecipients,receivedDateTime,sentDateTime,"
              "lastModifiedDateTime,isRead,flag,importance,categories,hasAttachments,conversationId,"
              "internetMessageId,bodyPreview,isDraft")
    response = subscribe(url, token, hook, resource=f"me/messages?$select={select}", lifecycle_url=life,
                         includeResourceData=True, encryptionCertificate=certificate,
                         encryptionCertificateId="cert-1")
    assert response.status_code == 201, response.text
    delivered = deliver(url, user)[0]
    receiver.wait(lambda: len(path.items) >= 1, "created")
    data = _decrypt(key, path.items[0]["encryptedContent"])
    assert set(data) == {"@odata.type", "@odata.etag", "id", *select.split(",")}
    shown = graph(url, token, "GET", f"me/messages/{delivered['restId']}?$select={select}").json()
    assert {k: v for k, v in data.items() if k != "@odata.type"} == \
        {k: v for k, v in shown.items() if not k.startswith("@odata.context")}
    assert data["isRead"] is False

    message = f"me/messages/{delivered['restId']}"
    assert graph(url, token, "PATCH", message, {"isRead": True}).status_code == 200
    assert graph(url, token, "PATCH", message, {"flag": {"flagStatus": "flagged"}}).status_code == 200
    receiver.wait(lambda: len(path.items) >= 3, "two updates")
    read, flagged = (_decrypt(key, item["encryptedContent"]) for item in path.items[1:3])
    assert (read["isRead"], read["flag"]["flagStatus"]) == (True, "notFlagged"), "the state of its own change"
    assert (flagged["isRead"], flagged["flag"]["flagStatus"]) == (True, "flagged")


def test_plain_notifications_carry_no_resource_data_or_tokens(url: str, token: str, user: Any,
                                                             receiver: Receiver) -> None:
    hook, path = receiver.new()
    assert subscribe(url, token, hook, resource="me/messages?$select=parentFolderId").status_code == 201
    deliver(url, user)
    receiver.wait(lambda: len(path.items) >= 1, "created")
    assert "encryptedContent" not in path.items[0] and "validationTokens" not in path.posts[0]


@pytest.mark.parametrize(("change", "message"), [
    ({}, "'encryptionCertificate' property is required"),
    ({"encryptionCertificate": "bm90IGEgY2VydA=="}, "'encryptionCertificateId' property is required"),
    ({"encryptionCertificate": "bm90IGEgY2VydA==", "encryptionCertificateId": "c"}, "not a base64-encoded X.509"),
    ({"encryptionCertificateId": "c" * 129}, "must not exceed 128"),
    ({"bits": 1024, "encryptionCertificateId": "c"}, "between 2048 and 4096"),
    ({"resource": "me/messages?$select=body", "encryptionCertificateId": "c"}, "cannot be selected"),
    ({"resource": "me/messages?$top=5", "encryptionCertificateId": "c"}, "not supported by the Graph sandbox"),
    ({"minutes": 1441, "encryptionCertificateId": "c"}, "1440 minutes"),
])
def test_rich_subscription_requests_graph_refuses(url: str, token: str, receiver: Receiver,
                                                  change: dict[str, Any], message: str) -> None:
    hook, path = receiver.new()
    bits = change.pop("bits", 2048)
    extra: dict[str, Any] = {"includeResourceData": True, "resource": change.pop("resource", "me/messages"),
                             "minutes": change.pop("minutes", 600)}
    if "encryptionCertificateId" in change and "encryptionCertificate" not in change:
        change["encryptionCertificate"] = _certificate(bits)[1]
    response = subscribe(url, token, hook, **extra, **change)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert path.validations == []
