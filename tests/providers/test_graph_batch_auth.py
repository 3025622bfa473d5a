"""GraphClient.batch_get (mailsync/providers/graph_client.py) when the token is refused inside a batch.

Graph authenticates each item of a ``$batch`` on its own and executes four
at a time, so a token that expires while a batch runs is refused (401) for
the items dispatched after its expiry only, inside a 200 envelope. Those
items, and only those, are sent again with a refreshed token; the others
were served and are not read twice. Against the sandbox, which authenticates
each item on its clock when the item is dispatched (``execution_ms`` per item,
four at a time, as Outlook executes them).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from graph_sandbox.tokens import unverified_claims
from mailsync.providers.graph_client import GraphClient
from tests.fixtures.graph_sandbox import SandboxTestServer
from tests.graph_sandbox.signin import user_tokens
from tests.providers.recording import Exchange, RecordingTransport

EXECUTION_S = 3.0      # each item's execution: the fifth item is dispatched this long after the first four
LEFT_S = 1.5           # the token's lifetime left when the batch is sent: the first four are in time


def test_only_the_items_refused_for_the_token_are_sent_again_with_a_refreshed_one(
        sandbox_factory: Callable[..., SandboxTestServer]) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=5, delta_lag_s=0.0, execution_ms=int(EXECUTION_S * 1000))
    address = sandbox.users[0].mail
    expiring = sandbox.user_token(address)
    claims = unverified_claims(expiring)
    refreshes: list[str] = []

    def token(force_refresh: bool) -> str:
        if not force_refresh:
            return expiring
        fresh = str(user_tokens(sandbox.base_url, address)[0]["access_token"])   # the refresh, as MSAL's
        refreshes.append(fresh)
        return fresh

    batches: list[list[str]] = []

    def record(exchange: Exchange) -> None:
        if exchange.request.url.endswith("/$batch"):
            batches.append([item["id"] for item in orjson.loads(exchange.request.body or b"{}")["requests"]])

    client = GraphClient(token, base_url=f"{sandbox.base_url}/v1.0",
                         session=RecordingTransport(GraphClient.new_session(), record))
    inbox = client.get("me/mailFolders/inbox", params={"$select": "id"})["id"]
    reads = [(f"me/mailFolders/{inbox}/messages/delta", {"$select": "id"}, None)] * 5
    pages_before = sandbox.admin("GET", "counters").json()["deltaPages"]
    # The sandbox's clock to just before the token's expiry: four items are dispatched at once, in
    # time; the fifth after the first four executed, when the token has expired.
    assert sandbox.admin("POST", "clock", json={"advance_s": claims["exp"] - claims["iat"] - LEFT_S}).ok

    answers = client.batch_get(reads)

    assert all(isinstance(answer, dict) and "value" in answer for answer in answers), answers
    assert len(refreshes) == 1, "one refresh for the batch"
    assert batches[0] == ["0", "1", "2", "3", "4"]
    # Sent again: the refused items alone (the fifth at least; all five if the host was too slow for
    # the first four to be in time). Every read was served once: one delta page each.
    assert len(batches) == 2 and "4" in batches[1], batches
    counters = sandbox.admin("GET", "counters").json()
    assert counters["byStatus"].get("401") == len(batches[1]), counters
    assert counters["deltaPages"] - pages_before == len(reads), "an item served was not read twice"
