"""Seeded fault injection over HTTP, and the notification-fault plan the subscription service asks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests

from graph_sandbox.faults import PROFILES, FaultPlan
from graph_sandbox.sync_states import EXPIRY_ANSWERS
from tests.fixtures.graph_sandbox import SandboxTestServer


def set_faults(sandbox: SandboxTestServer, profile: str = "none", seed: int = 7, **overrides: float) -> None:
    response = sandbox.admin("PUT", "faults", json={"profile": profile, "seed": seed, "overrides": overrides})
    assert response.status_code == 200, response.text


@pytest.fixture
def sandbox(sandbox_factory) -> SandboxTestServer:
    return sandbox_factory(users=1, messages_per_user=30)


def outcomes(sandbox: SandboxTestServer, count: int) -> list[tuple[int, str | None]]:
    session = sandbox.graph()
    user = sandbox.users[0]
    out = []
    for _ in range(count):
        try:
            response = session.get(f"users/{user.id}/mailFolders/inbox/messages?$top=3")
            out.append((response.status_code, response.headers.get("Retry-After")))
        except requests.exceptions.RequestException:
            out.append((0, None))
    return out


def test_same_seed_same_faults(sandbox_factory) -> None:
    runs = []
    for _ in range(2):
        sandbox = sandbox_factory(users=1, messages_per_user=10, faults="flaky", fault_seed=11)
        set_faults(sandbox, "flaky", seed=11, error_503=0.3, error_504=0.2)
        sandbox.graph().get(f"users/{sandbox.users[0].id}")       # warm the token outside the sequence
        runs.append(outcomes(sandbox, 40))
    assert runs[0] == runs[1]
    statuses = Counter(status for status, _ in runs[0])
    assert statuses[503] and statuses[504] and statuses[200]


def test_503_with_and_without_retry_after_and_504(sandbox: SandboxTestServer) -> None:
    set_faults(sandbox, error_503=1.0)
    results = outcomes(sandbox, 30)
    assert {status for status, _ in results} == {503}
    with_header = [r for _, r in results if r is not None]
    assert with_header and len(with_header) < len(results)
    assert all(1 <= int(r) <= 5 for r in with_header)
    set_faults(sandbox, error_504=1.0)
    response = sandbox.graph().get(f"users/{sandbox.users[0].id}/messages")
    assert response.status_code == 504 and response.json()["error"]["code"] == "GatewayTimeout"
    assert "Retry-After" not in response.headers
    counters = sandbox.admin("GET", "counters").json()
    assert counters["faultsInjected"] >= 31


def test_429_storm_holds_for_its_duration(sandbox: SandboxTestServer) -> None:
    set_faults(sandbox, storm=1.0, storm_s=120)
    first, second = outcomes(sandbox, 2)
    assert first[0] == second[0] == 429
    assert int(first[1]) == 120 and 1 <= int(second[1]) <= 120
    set_faults(sandbox)                         # a new plan ends the storm
    assert outcomes(sandbox, 1)[0][0] == 200


def test_truncated_bodies_are_cut(sandbox: SandboxTestServer) -> None:
    set_faults(sandbox, truncate=1.0)
    session = sandbox.graph()
    url = f"{sandbox.base_url}/v1.0/users/{sandbox.users[0].id}/mailFolders/inbox/messages?$top=5"
    kinds = set()
    for _ in range(12):
        try:
            response = session.get(url)
        except requests.exceptions.RequestException:
            kinds.add("connection")
            continue
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.content)
        kinds.add("json")
    assert kinds == {"connection", "json"}


def test_slow_responses_still_answer(sandbox: SandboxTestServer) -> None:
    set_faults(sandbox, slow=1.0, slow_ms=200)
    assert [status for status, _ in outcomes(sandbox, 3)] == [200, 200, 200]
    assert sandbox.admin("GET", "faults").json()["injected"] == 3


def test_expired_delta_tokens(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    first = session.get("me/mailFolders/inbox/messages/delta", headers={"Prefer": "odata.maxpagesize=5"})
    set_faults(sandbox, expire_delta=1.0)
    assert session.get("me/mailFolders/inbox/messages/delta").status_code == 200   # no token: no fault
    answers = set()
    for _ in range(16):
        gone = session.get(first.json()["@odata.nextLink"])
        answers.add((gone.status_code, gone.json()["error"]["code"]))
    # Outlook's forms of "this sync state is gone", several of them: clients must look at the code.
    assert answers <= {(status, code) for status, code, _ in EXPIRY_ANSWERS}
    assert len(answers) >= 2 and any(status == 400 for status, _ in answers)


def test_replayed_delta_pages_still_converge(sandbox: SandboxTestServer) -> None:
    set_faults(sandbox, duplicate_delta=1.0)
    session = sandbox.graph(sandbox.users[0])
    url = "me/mailFolders/inbox/messages/delta"
    ids: list[str] = []
    while url:
        body = session.get(url, headers={"Prefer": "odata.maxpagesize=4"}).json()
        ids += [item["id"] for item in body["value"]]
        url = body.get("@odata.nextLink")
    total = session.get("me/mailFolders/inbox").json()["totalItemCount"]
    assert len(set(ids)) == total and len(ids) > total          # every message, some twice


def test_unknown_profiles_and_settings_are_refused(sandbox: SandboxTestServer) -> None:
    assert sandbox.admin("PUT", "faults", json={"profile": "apocalypse"}).status_code == 400
    assert sandbox.admin("PUT", "faults", json={"profile": "flaky", "overrides": {"meteor": 1}}).status_code == 400
    assert sandbox.admin("PUT", "faults", json={"profile": "flaky", "overrides": {"error_503": 3}}).status_code == 400
    assert sandbox.admin("PATCH", "config", json={"faults": "apocalypse"}).status_code == 400
    described = sandbox.admin("GET", "faults").json()
    assert described["profile"] == "none" and set(described["profiles"]) == set(PROFILES)


def test_cli_profile_is_applied_at_start(sandbox_factory) -> None:
    sandbox = sandbox_factory(users=1, messages_per_user=5, faults="chaos")
    assert sandbox.admin("GET", "faults").json()["profile"] == "chaos"


# The notification side is asked in-process by the subscription service:
# these pin the contract it relies on.

def test_notification_fates_are_seeded_and_follow_the_rates() -> None:
    plan, same = FaultPlan("lossy-notifications", seed=3), FaultPlan("lossy-notifications", seed=3)
    fates = [plan.notification_fate() for _ in range(2000)]
    assert fates == [same.notification_fate() for _ in range(2000)]
    counts = Counter(fates)
    assert set(counts) == {"deliver", "drop", "duplicate", "delay"}
    assert 150 < counts["drop"] < 250 and 1300 < counts["deliver"] < 1500
    assert all(2.5 <= plan.notification_delay_s() <= 7.5 for _ in range(100))
    assert FaultPlan("none", seed=1).notification_fate() == "deliver"
    always = FaultPlan("none", seed=1, lifecycle_missed=1.0, notify_reorder=1.0)
    assert always.lifecycle_missed() and always.should_reorder()


def test_notification_faults_do_not_shift_request_faults() -> None:
    quiet, busy = FaultPlan("chaos", seed=5), FaultPlan("chaos", seed=5)
    for _ in range(100):
        busy.notification_fate()
    key = ("app", "user")
    first = [quiet.request_fault(key, float(i), delta_with_token=False) for i in range(200)]
    second = [busy.request_fault(key, float(i), delta_with_token=False) for i in range(200)]
    assert first == second
