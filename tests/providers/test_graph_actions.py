"""GraphActions against the Graph sandbox: the actions contract, plus Graph's own (batches, retries)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from mailsync.actions.models import MessageAction
from mailsync.providers.graph_actions import GraphActions
from mailsync.providers.graph_client import GraphClient
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.providers.actions_contract import ActionsContract, RichMessage
from tests.providers.recording import RecordingTransport
from tests.providers.test_graph_provider import GraphHarness, harness, sandbox  # noqa: F401  (fixtures)


def _actions(harness: GraphHarness, seen: list | None = None, **options: int) -> GraphActions:  # noqa: F811
    token = harness.server.user_token(harness.user.mail)
    session = GraphClient.new_session()
    if seen is not None:
        session = RecordingTransport(session, seen.append)
    client = GraphClient(lambda _force: token, base_url=f"{harness.server.base_url}/v1.0", session=session)
    return GraphActions(client, harness.account_id, sleep=lambda s: None, **options)  # type: ignore[arg-type]


@pytest.fixture
def actions(harness: GraphHarness) -> Iterator[GraphActions]:  # noqa: F811
    made = _actions(harness)
    yield made
    made.close()


@pytest.fixture
def rich(harness: GraphHarness) -> RichMessage:  # noqa: F811
    graph = harness.graph
    found = graph.get("me/messages", params={"$filter": "hasAttachments eq true", "$top": "1",
                                              "$select": "id,subject,parentFolderId"}).json()["value"][0]
    names = frozenset(a["name"] for a in graph.get(f"me/messages/{found['id']}/attachments").json()["value"])
    html = graph.get(f"me/messages/{found['id']}", params={"$select": "body"}).json()["body"]["content"]
    snippet = html.split("<p>", 2)[1].split("</p>", 1)[0][:20]
    return RichMessage(folder_id=found["parentFolderId"], message_id=found["id"], subject=found["subject"],
                       attachment_names=names, body_snippet=snippet)


class TestGraphActionsContract(ActionsContract):
    """The shared actions contract, on the Graph sandbox."""


def test_actions_go_in_batches_of_twenty_with_immutable_ids_per_item(harness: GraphHarness) -> None:  # noqa: F811
    seen: list = []
    actions = _actions(harness, seen)
    messages = sorted(harness.messages().values(), key=lambda m: m.message_id)[:45]
    outcomes = actions.apply([MessageAction(m.message_id, m.folder_id, is_read=not m.is_read) for m in messages])
    assert all(o.done for o in outcomes)
    batches = [r for r in seen if r.request.url.endswith("/$batch")]
    assert len(batches) == 3
    sizes = [len(orjson.loads(r.request.body)["requests"]) for r in batches]
    assert sizes == [20, 20, 5]
    for response in batches:
        for item in orjson.loads(response.request.body)["requests"]:
            assert item["headers"]["Prefer"] == 'IdType="ImmutableId"'
            assert item["method"] == "PATCH"


def test_items_refused_for_concurrency_are_sent_again(sandbox_factory) -> None:
    server: SandboxTestServer = sandbox_factory(users=2, messages_per_user=40, max_concurrency=2, execution_ms=50)
    harness = GraphHarness(server, server.users[0], server.users[1])  # noqa: F811
    seen: list = []
    actions = _actions(harness, seen)
    messages = sorted(harness.messages().values(), key=lambda m: m.message_id)[:12]
    outcomes = actions.apply([MessageAction(m.message_id, m.folder_id, flag_status=None, is_read=True)
                              for m in messages])
    assert all(o.done for o in outcomes)
    answers = [orjson.loads(r.content)["responses"] for r in seen if r.request.url.endswith("/$batch")]
    assert any(a["status"] == 429 for batch in answers for a in batch), "four at once over a limit of two"
    assert len(answers) >= 2
    assert all(m.is_read for m in harness.messages().values() if m.message_id in {x.message_id for x in messages})


def _sent(seen: list) -> list[list[dict]]:
    return [orjson.loads(r.request.body)["requests"] for r in seen if r.request.url.endswith("/$batch")]


def test_holding_several_slots_sends_chained_batches_at_once(harness: GraphHarness) -> None:  # noqa: F811
    # throttling-limits, "Outlook service limits for JSON batching": with dependsOn Graph sends one item of
    # a batch at a time, so up to four such batches may run at once on one mailbox.
    seen: list = []
    actions = _actions(harness, seen)
    messages = sorted(harness.messages().values(), key=lambda m: m.message_id)[:45]
    outcomes = actions.apply([MessageAction(m.message_id, m.folder_id, is_read=not m.is_read) for m in messages],
                             parallel=4)
    assert all(o.done for o in outcomes)
    batches = _sent(seen)
    assert sorted(len(b) for b in batches) == [5, 20, 20]
    for items in batches:
        assert [i.get("dependsOn") for i in items] == [None] + [[str(n)] for n in range(len(items) - 1)]
    truth = harness.messages()
    assert all(truth[m.message_id].is_read is (not m.is_read) for m in messages)


def test_an_item_failing_in_a_chain_stops_only_itself(harness: GraphHarness) -> None:  # noqa: F811
    # A failed item of a dependsOn batch leaves the rest of its chain unrun (424): they are sent again.
    seen: list = []
    actions = _actions(harness, seen)
    messages = sorted(harness.messages().values(), key=lambda m: m.message_id)[:30]
    wanted = [MessageAction(m.message_id, m.folder_id, is_read=not m.is_read) for m in messages]
    wanted[3] = MessageAction("AAMkNoSuchMessage", messages[3].folder_id, is_read=True)
    outcomes = actions.apply(wanted, parallel=2)
    assert not outcomes[3].done and outcomes[3].error is not None and outcomes[3].error.code == "not_found"
    assert all(o.done for n, o in enumerate(outcomes) if n != 3)
    truth = harness.messages()
    assert all(truth[m.message_id].is_read is (not m.is_read) for n, m in enumerate(messages) if n != 3)
    first, again = _sent(seen)[:2], _sent(seen)[2:]
    assert sorted(len(b) for b in first) == [10, 20]
    # Round two: the 16 items behind the failure, unordered (one failing item stops nothing else there).
    assert [len(b) for b in again] == [16] and all("dependsOn" not in i for i in again[0])


def test_chained_items_refused_for_concurrency_are_sent_again(sandbox_factory) -> None:
    # Two slots at the mailbox, four chains: two of the chains meet 429 (and their rest 424), sent again.
    server: SandboxTestServer = sandbox_factory(users=2, messages_per_user=100, max_concurrency=2, execution_ms=30)
    harness = GraphHarness(server, server.users[0], server.users[1])  # noqa: F811
    seen: list = []
    # Resent unordered, four at a time against two slots, half of each batch is refused again: more rounds.
    actions = _actions(harness, seen, retry_rounds=20)
    messages = sorted(harness.messages().values(), key=lambda m: m.message_id)[:80]
    outcomes = actions.apply([MessageAction(m.message_id, m.folder_id, is_read=True) for m in messages], parallel=4)
    assert all(o.done for o in outcomes)
    answers = [orjson.loads(r.content)["responses"] for r in seen if r.request.url.endswith("/$batch")]
    assert any(a["status"] == 429 for batch in answers for a in batch), "four chains over a limit of two"
    assert all(m.is_read for m in harness.messages().values() if m.message_id in {x.message_id for x in messages})


def test_a_move_answers_the_message_in_its_new_folder(harness: GraphHarness) -> None:  # noqa: F811
    actions = _actions(harness)
    message = sorted((m for m in harness.messages().values() if m.folder_id == harness.inbox_id),
                     key=lambda m: m.message_id)[0]
    archive = harness.graph.get("me/mailFolders/archive").json()["id"]
    (outcome,) = actions.apply([MessageAction(message.message_id, message.folder_id, destination=archive)])
    assert outcome.message is not None and outcome.message.folder_id == archive
    assert outcome.message.message_id == message.message_id
    (again,) = actions.apply([MessageAction(message.message_id, archive, destination=archive)])
    assert again.done
