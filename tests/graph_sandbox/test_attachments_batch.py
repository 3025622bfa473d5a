"""The sandbox's attachments (list, get, ``$value``) and JSON batching (``$batch``) over HTTP."""

from __future__ import annotations

import base64

import pytest

from tests.fixtures.graph_sandbox import SandboxTestServer


@pytest.fixture
def sandbox(sandbox_factory) -> SandboxTestServer:
    return sandbox_factory(users=2, messages_per_user=80)


def _with_attachments(sandbox: SandboxTestServer) -> list[dict]:
    graph = sandbox.graph(sandbox.users[0])
    messages = graph.get("me/messages", params={"$top": "200", "$select": "id,hasAttachments,subject"}).json()["value"]
    return [m for m in messages if m["hasAttachments"]]


def test_seeded_messages_carry_file_attachments_with_bytes_and_value(sandbox: SandboxTestServer) -> None:
    graph = sandbox.graph(sandbox.users[0])
    found = _with_attachments(sandbox)
    assert found, "the seed gives some messages attachments"
    kinds: set[str] = set()
    for message in found:
        listed = graph.get(f"me/messages/{message['id']}/attachments").json()["value"]
        assert listed
        for item in listed:
            assert item["@odata.type"] == "#microsoft.graph.fileAttachment"
            content = base64.b64decode(item["contentBytes"])
            assert len(content) == item["size"]
            one = graph.get(f"me/messages/{message['id']}/attachments/{item['id']}").json()
            assert one["contentBytes"] == item["contentBytes"]
            raw = graph.get(f"me/messages/{message['id']}/attachments/{item['id']}/$value")
            assert raw.status_code == 200
            assert raw.content == content
            assert raw.headers["Content-Type"].startswith(item["contentType"])
            kinds.add(item["contentType"])
    assert len(kinds) >= 2


def test_attachment_select_and_unknown_ids(sandbox: SandboxTestServer) -> None:
    graph = sandbox.graph(sandbox.users[0])
    message = _with_attachments(sandbox)[0]
    listed = graph.get(f"me/messages/{message['id']}/attachments",
                       params={"$select": "name,size,contentType,isInline"}).json()["value"]
    assert all("contentBytes" not in item and item["name"] for item in listed)
    assert graph.get(f"me/messages/{message['id']}/attachments/AAMkAttNope").status_code == 404
    assert graph.get(f"me/messages/{message['id']}/attachments", params={"$select": "bogus"}).status_code == 400


def test_attachments_keep_their_ids_across_a_move(sandbox: SandboxTestServer) -> None:
    graph = sandbox.graph(sandbox.users[0])
    message = _with_attachments(sandbox)[0]
    before = [a["id"] for a in graph.get(f"me/messages/{message['id']}/attachments").json()["value"]]
    archive = graph.get("me/mailFolders/archive").json()["id"]
    assert graph.post(f"me/messages/{message['id']}/move", json={"destinationId": archive}).status_code == 201
    after = [a["id"] for a in graph.get(f"me/messages/{message['id']}/attachments").json()["value"]]
    assert before == after


def test_batch_runs_each_item_and_answers_each(sandbox: SandboxTestServer) -> None:
    graph = sandbox.graph(sandbox.users[0])
    messages = graph.get("me/messages", params={"$top": "3", "$select": "id,isRead"}).json()["value"]
    requests_ = [{"id": str(n), "method": "PATCH", "url": f"/me/messages/{m['id']}",
                  "headers": {"Content-Type": "application/json"}, "body": {"isRead": not m["isRead"]}}
                 for n, m in enumerate(messages)]
    requests_.append({"id": "missing", "method": "GET", "url": "me/messages/AAMkNothingHere"})
    requests_.append({"id": "nobodytype", "method": "PATCH", "url": f"me/messages/{messages[0]['id']}",
                      "body": {"isRead": True}})
    response = graph.post("$batch", json={"requests": requests_})
    assert response.status_code == 200, response.text
    answers = {a["id"]: a for a in response.json()["responses"]}
    for n, m in enumerate(messages):
        assert answers[str(n)]["status"] == 200
        assert answers[str(n)]["body"]["isRead"] is (not m["isRead"])
    assert answers["missing"]["status"] == 404
    assert answers["nobodytype"]["status"] == 400
    truth = {m["id"]: m for m in sandbox.snapshot(sandbox.users[0])["messages"]}
    assert all(truth[m["id"]]["isRead"] is (not m["isRead"]) for m in messages)


def test_batch_limits_and_dependencies(sandbox: SandboxTestServer) -> None:
    graph = sandbox.graph(sandbox.users[0])
    too_many = [{"id": str(n), "method": "GET", "url": "me"} for n in range(21)]
    assert graph.post("$batch", json={"requests": too_many}).status_code == 400
    assert graph.post("$batch", json={"requests": []}).status_code == 400
    duplicate = [{"id": "1", "method": "GET", "url": "me"}, {"id": "1", "method": "GET", "url": "me"}]
    assert graph.post("$batch", json={"requests": duplicate}).status_code == 400
    chain = [{"id": "a", "method": "GET", "url": "me/messages/AAMkNope"},
             {"id": "b", "method": "GET", "url": "me", "dependsOn": ["a"]}]
    answers = {a["id"]: a["status"] for a in graph.post("$batch", json={"requests": chain}).json()["responses"]}
    assert answers == {"a": 404, "b": 424}


def test_batch_items_share_the_mailbox_concurrency_limit(sandbox_factory) -> None:
    # Four at a time from a batch fill the mailbox's four slots while they execute: a fifth request to the
    # same mailbox made meanwhile is refused, like Graph's MailboxConcurrency 429 inside a batch.
    sandbox = sandbox_factory(users=1, messages_per_user=30, execution_ms=300)
    graph = sandbox.graph(sandbox.users[0])
    ids = [m["id"] for m in graph.get("me/messages", params={"$top": "20", "$select": "id"}).json()["value"]]
    items = [{"id": str(n), "method": "GET", "url": f"me/messages/{mid}?$select=id"} for n, mid in enumerate(ids)]
    import threading
    outside: list[int] = []

    def poke() -> None:
        outside.append(sandbox.graph(sandbox.users[0]).get("me/messages", params={"$top": "1"}).status_code)

    thread = threading.Timer(0.05, poke)
    thread.start()
    answers = graph.post("$batch", json={"requests": items}).json()["responses"]
    thread.join()
    assert all(a["status"] == 200 for a in answers)
    assert outside == [429]


def _message_ids(sandbox: SandboxTestServer, n: int) -> list[str]:
    graph = sandbox.graph(sandbox.users[0])
    return [m["id"] for m in graph.get("me/messages", params={"$top": str(n), "$select": "id"}).json()["value"]]


def test_a_batch_pays_the_round_trip_once_and_holds_no_slot_meanwhile(sandbox_factory) -> None:
    """Microsoft: "Requests in a batch are evaluated individually against throttling limits" (json-batching,
    "Batch size limitations"); Graph "sends the Outlook service up to four individual requests from the
    batch at a time" (throttling-limits, "Outlook service limits for JSON batching"). The items travel
    inside Microsoft's network: the client's round trip (``latency_ms``) is the one POST, and an item holds
    a mailbox slot only while Outlook executes it (``execution_ms``). A request to the mailbox made while
    the batch is on the wire finds the slots free; the sandbox used to charge the latency to every item
    inside its slot (a batch of 20 was five round trips, and this request got a 429)."""
    import threading

    sandbox = sandbox_factory(users=1, messages_per_user=30, latency_ms=400)
    graph = sandbox.graph(sandbox.users[0])
    items = [{"id": str(n), "method": "GET", "url": f"me/messages/{mid}?$select=id"}
             for n, mid in enumerate(_message_ids(sandbox, 20))]
    outside: list[int] = []
    poke = threading.Timer(0.2, lambda: outside.append(
        sandbox.graph(sandbox.users[0]).get("me/messages", params={"$top": "1"}).status_code))
    poke.start()
    answers = graph.post("$batch", json={"requests": items}).json()["responses"]
    poke.join()
    assert outside == [200]
    assert [a["status"] for a in answers] == [200] * 20


def test_four_dependson_batches_at_once_fit_the_mailbox_a_fifth_does_not(sandbox_factory) -> None:
    """With ``dependsOn`` Graph sends "one request from the batch at a time", so apps targeting one mailbox
    can "have up to four such batch requests run concurrently" (throttling-limits, "Outlook service limits
    for JSON batching"): each holds one slot at a time. A fifth at once meets a full mailbox: its item is
    429 and the items depending on it are 424."""
    import threading

    sandbox = sandbox_factory(users=1, messages_per_user=30, execution_ms=1000)
    ids = _message_ids(sandbox, 15)

    def chain(part: list[str]) -> list[dict]:
        return [{"id": str(n), "method": "GET", "url": f"me/messages/{mid}?$select=id",
                 **({"dependsOn": [str(n - 1)]} if n else {})} for n, mid in enumerate(part)]

    def send_at_once(batches: list[list[dict]]) -> list[list[int]]:
        start = threading.Barrier(len(batches))
        answers: list[list[int]] = [[] for _ in batches]

        def one(n: int) -> None:
            graph = sandbox.graph(sandbox.users[0])
            start.wait()
            found = graph.post("$batch", json={"requests": batches[n]}).json()["responses"]
            answers[n] = [a["status"] for a in sorted(found, key=lambda a: int(a["id"]))]

        threads = [threading.Thread(target=one, args=(n,)) for n in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    four = send_at_once([chain(ids[n * 3:n * 3 + 3]) for n in range(4)])
    assert four == [[200, 200, 200]] * 4
    five = send_at_once([chain(ids[n * 3:n * 3 + 3]) for n in range(5)])
    refused = [statuses for statuses in five if 429 in statuses]
    assert refused, "five chains of one slot each over a mailbox of four"
    for statuses in refused:
        first = statuses.index(429)
        assert statuses[first + 1:] == [424] * (len(statuses) - first - 1)
