"""GraphProvider against the Graph sandbox: the provider contract, plus what is Graph's own.

Graph-specific: the request shapes (ImmutableId and maxpagesize on every
call, ``$select`` of exactly the stored fields, never ``$top`` on delta),
cursors that never show a URL and refuse links to another origin, 410 as
CursorExpired, 429 / 503 as throttled / unavailable with Retry-After, and
the message mapping (versions, whole-second ties, fast records that equal
constructor-built ones).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from graph_sandbox.state import SandboxUser
from mailsync.errors import CursorExpired, ProviderThrottled, ProviderUnavailable
from mailsync.models import Account, AccountStatus, Address, FlagStatus, Message, MessageBatch, Provider
from mailsync.providers.graph import (
    FOLDER_FIELDS,
    MESSAGE_FIELDS,
    GraphProvider,
    GraphProviderFactory,
    decode_cursor,
    encode_cursor,
    map_message,
    message_version,
    notified_version,
)
from mailsync.providers.graph_client import GraphClient, is_expired_state
from mailsync.settings import Settings
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.providers.contract import Mirror, ProviderContract, TruthFolder, TruthMessage, assert_mirror_equals
from tests.providers.recording import RecordingTransport, SentRequest


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass
class GraphHarness:
    """A sandbox mailbox (user 0), changed through Graph by its owner; sendMail from user 1."""

    server: SandboxTestServer
    user: SandboxUser
    sender: SandboxUser
    account_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    requests_seen: list[SentRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.graph = self.server.graph(self.user)
        self.inbox_id = self.graph.get("me/mailFolders/inbox").json()["id"]

    def open(self, *, page_size: int = 50) -> GraphProvider:
        token = self.server.user_token(self.user.mail)
        session = RecordingTransport(GraphClient.new_session(), lambda e: self.requests_seen.append(e.request))
        client = GraphClient(lambda _force: token, base_url=f"{self.server.base_url}/v1.0", session=session)
        return GraphProvider(client, self.account_id, page_size=page_size)

    def snapshot(self) -> dict[str, Any]:
        return self.server.snapshot(self.user)

    def folders(self) -> dict[str, TruthFolder]:
        return {f["id"]: TruthFolder(f["id"], f["displayName"], f["parentFolderId"])
                for f in self.snapshot()["folders"]}

    def messages(self) -> dict[str, TruthMessage]:
        return {m["id"]: TruthMessage(m["id"], m["folderId"], m["subject"], m["isRead"],
                                      m["flagStatus"] == "flagged", (m["from"] or {}).get("address", ""),
                                      _time(m["receivedDateTime"]))
                for m in self.snapshot()["messages"]}

    def _ok(self, response: requests.Response) -> Any:
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def set_read(self, message_id: str, read: bool) -> None:
        self._ok(self.graph.patch(f"me/messages/{message_id}", json={"isRead": read}))

    def set_flagged(self, message_id: str, flagged: bool) -> None:
        self._ok(self.graph.patch(f"me/messages/{message_id}",
                                  json={"flag": {"flagStatus": "flagged" if flagged else "notFlagged"}}))

    def move(self, message_id: str, folder_id: str) -> None:
        self._ok(self.graph.post(f"me/messages/{message_id}/move", json={"destinationId": folder_id}))

    def delete(self, message_id: str, *, permanently: bool = False) -> None:
        self._ok(self.graph.delete(f"me/messages/{message_id}"))
        if permanently:  # the first delete moved it to Deleted Items (same immutable id)
            self._ok(self.graph.delete(f"me/messages/{message_id}"))

    def deliver(self, subject: str) -> None:
        self._ok(self.server.graph(self.sender).post("me/sendMail", json={"message": {
            "subject": subject, "body": {"contentType": "text", "content": "hello"},
            "toRecipients": [{"emailAddress": {"address": self.user.mail}}]}}))

    def create_folder(self, name: str) -> str:
        return str(self._ok(self.graph.post("me/mailFolders", json={"displayName": name}))["id"])

    def rename_folder(self, folder_id: str, name: str) -> None:
        self._ok(self.graph.patch(f"me/mailFolders/{folder_id}", json={"displayName": name}))

    def delete_folder(self, folder_id: str) -> None:
        self._ok(self.graph.delete(f"me/mailFolders/{folder_id}"))

    def break_cursors(self) -> None:
        self._ok(self.server.admin("POST", f"users/{self.user.id}/invalidate-delta"))


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxTestServer]) -> SandboxTestServer:
    # The contract reads a change right after making it: no delta lag here (the engine's tests have it,
    # and the token cache, replays and search folders stay on).
    return sandbox_factory(users=2, messages_per_user=60, delta_lag_s=0.0)


@pytest.fixture
def harness(sandbox: SandboxTestServer) -> Iterator[GraphHarness]:
    users = sandbox.users
    yield GraphHarness(sandbox, users[0], users[1])


class TestGraphProviderContract(ProviderContract):
    """The shared provider contract, on the Graph sandbox."""


# --- requests as Graph sees them ------------------------------------------------------------

def test_every_call_asks_for_immutable_ids_and_page_size(harness: GraphHarness) -> None:
    Mirror().sync(harness.open(page_size=25))
    assert harness.requests_seen
    for request in harness.requests_seen:
        prefer = request.headers.get("Prefer", "")
        assert 'IdType="ImmutableId"' in prefer
        if "/delta" in (request.url or ""):
            assert "odata.maxpagesize=25" in prefer


def test_reads_batched_together_keep_each_requests_headers_and_fail_alone(harness: GraphHarness) -> None:
    # message_changes_many sends JSON batches: Graph does not carry the envelope's Prefer over to the
    # items, so each must ask for its page size (and immutable ids) itself; and Graph answers each item
    # on its own, an expired sync state or a 429 inside a 200 envelope.
    provider = harness.open(page_size=5)
    in_inbox = [m for m in harness.messages().values() if m.folder_id == harness.inbox_id]
    assert len(in_inbox) > 5
    other = next(fid for fid in harness.folders() if fid != harness.inbox_id)
    first = provider.message_changes_many([(harness.inbox_id, None)])[0]
    assert isinstance(first, MessageBatch) and len(first.upserts) == 5 and not first.complete
    alone = provider.message_changes(harness.inbox_id, None)
    assert [m.message_id for m in first.upserts] == [m.message_id for m in alone.upserts], "the same ids"
    batches = [r for r in harness.requests_seen if (r.url or "").endswith("/$batch")]
    assert batches and all(r.method == "POST" for r in batches)
    for item in json.loads(batches[-1].body or b"{}")["requests"]:
        assert 'IdType="ImmutableId"' in item["headers"]["Prefer"]
        assert "odata.maxpagesize=5" in item["headers"]["Prefer"]
        assert "$select=" in item["url"] and "$top" not in item["url"]
    assert harness.server.admin("PUT", "faults", json={"profile": "none", "overrides": {"expire_delta": 1.0}}).ok
    pages = provider.message_changes_many([(harness.inbox_id, first.cursor), (other, None)])
    assert isinstance(pages[0], CursorExpired), "a delta call with a state token: its sync state is gone"
    assert isinstance(pages[1], MessageBatch), "a first call has no state to lose"
    assert harness.server.admin("PUT", "faults", json={"profile": "none", "overrides": {"storm": 1.0}}).ok
    throttled = provider.message_changes_many([(other, None)])[0]
    assert isinstance(throttled, ProviderThrottled) and throttled.retry_after_s > 0


def test_delta_selects_exactly_the_stored_fields_and_never_top(harness: GraphHarness) -> None:
    Mirror().sync(harness.open())
    first_message_delta = [r for r in harness.requests_seen
                           if "/messages/delta" in (r.url or "") and "%24select" in (r.url or "")]
    assert first_message_delta
    for request in harness.requests_seen:
        query = parse_qs(urlsplit(request.url or "").query)
        if "/delta" in (request.url or ""):
            assert "$top" not in query
    query = parse_qs(urlsplit(first_message_delta[0].url or "").query)
    assert set(query["$select"][0].split(",")) == set(MESSAGE_FIELDS) | {"body"}
    assert query["$orderby"] == ["receivedDateTime desc"]
    folder_delta = next(r for r in harness.requests_seen if "mailFolders/delta" in (r.url or ""))
    query = parse_qs(urlsplit(folder_delta.url or "").query)
    assert set(query["$select"][0].split(",")) == set(FOLDER_FIELDS) - {"id"}


def test_body_text_is_stored_only_when_enabled(harness: GraphHarness) -> None:
    with_body = harness.open()
    messages = with_body.message_changes(harness.inbox_id, None).upserts
    assert any(m.body_text for m in messages)
    token = harness.server.user_token(harness.user.mail)
    client = GraphClient(lambda _f: token, base_url=f"{harness.server.base_url}/v1.0")
    without = GraphProvider(client, harness.account_id, store_body_text=False)
    assert all(m.body_text is None for m in without.message_changes(harness.inbox_id, None).upserts)


def test_a_delta_batch_carries_each_upserts_version_tag_as_notifications_name_it(harness: GraphHarness) -> None:
    provider = harness.open()
    batch = provider.message_changes(harness.inbox_id, None)
    assert batch.upserts and set(batch.versions) == {m.message_id for m in batch.upserts}
    message = batch.upserts[0]
    tag = harness.graph.get(f"me/messages/{message.message_id}?$select=id").json()["@odata.etag"]
    assert batch.versions[message.message_id] == tag
    while not batch.complete:
        batch = provider.message_changes(harness.inbox_id, batch.cursor)
    harness.graph.patch(f"me/messages/{message.message_id}", json={"isRead": not message.is_read})
    tag_after = harness.graph.get(f"me/messages/{message.message_id}?$select=id").json()["@odata.etag"]
    assert tag_after != tag
    changed = provider.message_changes(harness.inbox_id, batch.cursor)
    assert changed.versions == {message.message_id: tag_after}


def test_a_cursor_pointing_elsewhere_is_refused(harness: GraphHarness) -> None:
    provider = harness.open()
    batch = provider.message_changes(harness.inbox_id, None)
    link, _ = decode_cursor(batch.cursor)
    evil = encode_cursor(link.replace("127.0.0.1", "evil.example"), complete=batch.complete)
    with pytest.raises(CursorExpired):
        provider.message_changes(harness.inbox_id, evil)
    assert not any("evil.example" in (r.url or "") for r in harness.requests_seen)


@pytest.mark.parametrize("status", [400, 410])
def test_an_evicted_link_is_cursor_expired_whatever_the_status(
        sandbox_factory: Callable[..., SandboxTestServer], status: int) -> None:
    # Outlook keeps the newest 3 links of a folder; "a 40X-series error with codes such as syncStateNotFound".
    sandbox = sandbox_factory(users=2, messages_per_user=80, delta_lag_s=0.0, delta_expired_status=status)
    harness = GraphHarness(sandbox, sandbox.users[0], sandbox.users[1])
    provider = harness.open(page_size=5)
    cursors = []
    cursor = None
    for _ in range(5):
        cursor = provider.message_changes(harness.inbox_id, cursor).cursor
        cursors.append(cursor)
    with pytest.raises(CursorExpired):
        provider.message_changes(harness.inbox_id, cursors[0])
    assert provider.message_changes(harness.inbox_id, cursors[-1]).upserts


def test_expired_sync_states_are_told_by_code() -> None:
    for status, code in [(410, ""), (410, "SyncStateNotFound"), (400, "SyncStateNotFound"), (400, "syncStateNotFound"),
                         (400, "SyncStateInvalid"), (410, "resyncRequired"), (400, "ResyncRequired"),
                         (404, "SyncStateNotFound")]:
        assert is_expired_state(status, code), (status, code)
    for status, code in [(400, "ErrorInvalidRequest"), (400, ""), (404, "ErrorItemNotFound"),
                         (401, "SyncStateNotFound"), (429, "SyncStateNotFound"), (503, "SyncStateNotFound")]:
        assert not is_expired_state(status, code), (status, code)


def test_search_folders_are_never_reported_as_folders(sandbox_factory: Callable[..., SandboxTestServer]) -> None:
    sandbox = sandbox_factory(users=2, messages_per_user=40, delta_lag_s=0.0, search_folders=2)
    harness = GraphHarness(sandbox, sandbox.users[0], sandbox.users[1])
    searches = {f["id"] for f in harness.snapshot()["searchFolders"]}
    assert len(searches) == 2
    provider = harness.open(page_size=3)
    seen: set[str] = set()
    cursor = None
    while True:
        batch = provider.folder_changes(cursor)
        seen.update(f.folder_id for f in batch.upserts)
        seen.update(batch.removals)
        cursor = batch.cursor
        if batch.complete:
            break
    assert seen == set(harness.folders()), "every real folder, no search folder"
    for folder_id in searches:
        assert harness.graph.delete(f"me/mailFolders/{folder_id}").status_code == 204
    # A removal entry carries no type: it is reported, for a folder the engine never had.
    later = provider.folder_changes(cursor)
    assert not later.upserts and set(later.removals) <= searches


def test_throttling_and_outages_carry_retry_after(harness: GraphHarness) -> None:
    provider = harness.open()
    server = harness.server
    assert server.admin("PUT", "faults", json={"profile": "none", "overrides": {"storm": 1.0, "storm_s": 7}}
                        ).status_code == 200
    with pytest.raises(ProviderThrottled) as throttled:
        provider.message_changes(harness.inbox_id, None)
    assert 0 < throttled.value.retry_after_s <= 7
    assert server.admin("PUT", "faults", json={"profile": "none", "overrides": {"error_504": 1.0}}).status_code == 200
    with pytest.raises(ProviderUnavailable):
        provider.folder_changes(None)
    assert server.admin("PUT", "faults", json={"profile": "none"}).status_code == 200
    assert provider.folder_changes(None).upserts


def test_factory_uses_the_sandbox_root_and_the_token_provider(harness: GraphHarness) -> None:
    token = harness.server.user_token(harness.user.mail)
    asked: list[tuple[str, bool]] = []

    class Tokens:
        def access_token(self, account_id: str, *, force_refresh: bool = False) -> str:
            asked.append((account_id, force_refresh))
            return token

    settings = Settings(graph_sandbox_url=harness.server.base_url, graph_page_size=9)
    factory = GraphProviderFactory(settings, Tokens())
    assert factory.base_url == f"{harness.server.base_url}/v1.0"
    now = datetime.now(UTC)
    account = Account(account_id="acc-1", provider=Provider.OUTLOOK, status=AccountStatus.SYNCING,
                      access_token_hash="x", created_at=now, updated_at=now)
    provider = factory.open(account)
    batch = provider.message_changes(harness.inbox_id, None)
    assert len(batch.upserts) + len(batch.removals) == 9
    assert asked and asked[0] == ("acc-1", False)
    assert all(m.account_id == "acc-1" for m in batch.upserts)
    provider.close()
    assert provider.folder_changes(None).upserts, "closing one provider leaves the shared pool usable"


def test_expired_token_is_refreshed_once(harness: GraphHarness) -> None:
    good = harness.server.user_token(harness.user.mail)
    calls: list[bool] = []

    def token(force: bool) -> str:
        calls.append(force)
        return good if force else "expired-or-garbage"

    provider = GraphProvider(GraphClient(token, base_url=f"{harness.server.base_url}/v1.0"), harness.account_id)
    assert provider.folder_changes(None).upserts
    assert True in calls


def test_full_sync_against_the_sandbox_snapshot_fields(harness: GraphHarness) -> None:
    mirror = Mirror()
    mirror.sync(harness.open(page_size=500))
    assert_mirror_equals(mirror, harness)
    truth = {m["id"]: m for m in harness.snapshot()["messages"]}
    for message_id, message in mirror.messages.items():
        want = truth[message_id]
        assert message.categories == tuple(want["categories"])
        assert message.importance == want["importance"]
        assert message.conversation_id == want["conversationId"]
        assert message.internet_message_id == want["internetMessageId"]
        assert message.body_preview == want["bodyPreview"]
        assert [a.address for a in message.to] == [a["address"] for a in want["to"]]
        assert message.version // 1000 * 1000 == int(_time(want["lastModifiedDateTime"]).timestamp() * 1000)  # type: ignore[union-attr]


# --- mapping ----------------------------------------------------------------------------------

GRAPH_ITEM: dict[str, Any] = {
    "@odata.etag": 'W/"CQAAABYAAAB"', "id": "AAkALgAAAA-id", "parentFolderId": "ignored-parent",
    "subject": "Budget", "from": {"emailAddress": {"name": "Alice", "address": "alice@example.com"}},
    "toRecipients": [{"emailAddress": {"name": "Bob", "address": "bob@example.com"}}],
    "ccRecipients": [], "receivedDateTime": "2026-10-01T10:11:12Z", "sentDateTime": "2026-10-01T10:11:10Z",
    "lastModifiedDateTime": "2026-10-02T10:11:12Z", "isRead": True, "flag": {"flagStatus": "complete"},
    "importance": "high", "categories": ["Blue"], "hasAttachments": True, "conversationId": "conv",
    "internetMessageId": "<m@x>", "bodyPreview": "Hello", "isDraft": False,
    "body": {"contentType": "html", "content": "<p>Hello&nbsp;<b>there</b> &amp; you</p>"},
}


def test_mapped_records_equal_constructor_built_ones() -> None:
    message = map_message(GRAPH_ITEM, "acc", "folder-1", 100, observed_ms=0)
    built = Message(**{f.name: getattr(message, f.name) for f in fields(Message)})
    assert message == built and hash(message) == hash(built)
    assert message.folder_id == "folder-1", "the stream's folder, not parentFolderId"
    assert message.sender == Address("alice@example.com", "Alice")
    assert message.flag_status is FlagStatus.COMPLETE and message.is_read and message.has_attachments
    assert message.body_text == "Hello there & you"
    assert message.received_at == datetime(2026, 10, 1, 10, 11, 12, tzinfo=UTC)


def test_versions_break_whole_second_ties_by_read_time() -> None:
    modified = datetime(2026, 10, 2, 10, 11, 12, tzinfo=UTC)
    base = int(modified.timestamp()) * 1000
    early = message_version(modified, base + 200)
    late = message_version(modified, base + 350)
    assert base <= early < late <= base + 999
    assert message_version(modified, base - 5_000) == base + 1, "a clock behind Graph's never goes below"
    assert notified_version(modified) == base < message_version(modified, base), \
        "a notified state sits below every delta reading of it (the floor is kept for it)"
    assert notified_version(datetime(2026, 10, 2, 10, 11, 13, tzinfo=UTC)) > message_version(modified, base + 60_000)
    assert message_version(modified, base + 60_000) == base + 999
    next_second = message_version(datetime(2026, 10, 2, 10, 11, 13, tzinfo=UTC), base + 1_000)
    assert next_second > message_version(modified, base + 60_000), "the version only grows"
    precise = datetime(2026, 10, 2, 10, 11, 12, 345_000, tzinfo=UTC)
    assert message_version(precise, base + 900) == base + 345, "millisecond timestamps are kept as they are"


def test_the_first_screen_loses_to_any_later_read_of_the_same_state(harness: GraphHarness) -> None:
    # The Inbox's first round may remove a first-screen row as unseen (delta lags); the deletion's tombstone
    # is one version above it, and the round that lists the message later must still get in.
    provider = harness.open()
    first = {m.message_id: m.version for m in provider.newest_messages(harness.inbox_id, 10)}
    mirror = Mirror()
    mirror.sync(provider)
    assert first
    assert all(first[mid] + 1 <= mirror.messages[mid].version for mid in first), \
        [(first[mid], mirror.messages[mid].version) for mid in first]


def test_unreadable_cursors_are_cursor_expired() -> None:
    for bad in ("", "g1.", "g1.!!!", "g1.eyJ4IjoxfQ", "http://graph.microsoft.com/v1.0/me/mailFolders/delta"):
        with pytest.raises(CursorExpired):
            decode_cursor(bad)
    link, roles = decode_cursor(encode_cursor("https://g/x?$skiptoken=1", complete=False, roles={"f": "inbox"}))
    assert link == "https://g/x?$skiptoken=1" and roles == {"f": "inbox"}
