"""Shape checks of notification bodies (pure: no services needed)."""

from __future__ import annotations

import pytest

from mailsync.errors import InputError
from mailsync.monitoring.lifecycle import LifecycleEvent, parse_lifecycle_notifications
from mailsync.monitoring.notifications import merge_changes, parse_change_notifications
from mailsync.monitoring.records import ChangeType


def item(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "subscriptionId": "0f6a2c1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
        "clientState": "s" * 64,
        "changeType": "updated",
        "resource": "Users/u1/Messages/AAMkAD-1",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": "AAMkAD-1"},
    }
    base.update(overrides)
    return base


def test_a_graph_collection_parses() -> None:
    parsed = parse_change_notifications({"value": [item(), item(changeType="created")]})
    assert [(p.change_type, p.message_id) for p in parsed] == [
        (ChangeType.UPDATED, "AAMkAD-1"), (ChangeType.CREATED, "AAMkAD-1")]


@pytest.mark.parametrize("body", [
    None, [], "value", {"value": {}}, {"values": []}, {"value": [1]}, {"value": [item(subscriptionId=5)]},
    {"value": [item(subscriptionId="")]}, {"value": [item(changeType=None)]},
    {"value": [item(clientState=7)]}, {"value": [item(clientState="x" * 129)]},
    {"value": [item(), item(resourceData="AAMk")]}, {"value": [item(resourceData={"id": 3})]},
])
def test_malformed_bodies_are_rejected_whole(body: object) -> None:
    with pytest.raises(InputError):
        parse_change_notifications(body)


def test_unknown_change_types_and_odd_ids_are_kept_for_dropping_not_rejected() -> None:
    parsed = parse_change_notifications({"value": [
        item(changeType="missed"),
        item(resourceData={"id": "<script>alert(1)</script>"}),
        item(resourceData=None, resource="Users('u')/Messages('AAMk=')"),
        item(resourceData=None, resource="Users/u/Messages"),
    ]})
    assert parsed[0].change_type is None
    assert parsed[1].message_id is None
    assert parsed[2].message_id == "AAMk="
    assert parsed[3].message_id is None


def test_lifecycle_events_parse_and_unknown_ones_are_dropped() -> None:
    parsed = parse_lifecycle_notifications({"value": [
        {"subscriptionId": "s1", "clientState": "c", "lifecycleEvent": "missed"},
        {"subscriptionId": "s1", "clientState": "c", "lifecycleEvent": "somethingNew"},
    ]})
    assert [p.event for p in parsed] == [LifecycleEvent.MISSED, None]
    with pytest.raises(InputError):
        parse_lifecycle_notifications({"value": [{"subscriptionId": "s1", "clientState": "c"}]})


def test_merge_keeps_distinct_pairs_in_order_and_overflows_past_the_limit() -> None:
    merged, overflow = merge_changes([("created", "a")], [("updated", "a"), ("created", "a"), ("deleted", "b")],
                                     max_ids=2)
    assert merged == (("created", "a"), ("updated", "a"), ("deleted", "b")) and not overflow
    merged, overflow = merge_changes(merged, [("created", "c")], max_ids=2)
    assert merged == () and overflow
