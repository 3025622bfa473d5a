"""ACTION jobs run out of order: the queue redelivers an older job, or retries it after a 429, after a newer one ran.

Applied blindly, the older action would be the provider's last word and the
next delta round would carry it into the store: the user's last action gone,
nobody told. The action ledger (mailsync.actions.ordering) keeps, per message
and field, the latest accepted action; a job drops what a newer one claimed,
and writes again what a newer one claimed while its own write was in flight.
"""

from __future__ import annotations

import pytest

from mailsync.realtime.signalr_messages import TARGET_ACTIONS_FAILED
from tests.actions.test_service import World, _inbox


def _later(world: World) -> list:  # type: ignore[type-arg]
    """Take the queued jobs away, to be run after the ones queued next."""
    held, world.queue.jobs = world.queue.jobs, []
    return held


@pytest.mark.parametrize("world_name", ["outlook", "imap"])
def test_an_older_action_redelivered_after_a_newer_one_does_not_undo_it(world_name: str,
                                                                        request: pytest.FixtureRequest) -> None:
    world: World = request.getfixturevalue(world_name)
    (message_id,) = _inbox(world, is_read=False)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True})
    older = _later(world)
    world.service.update(world.account_id, world.token, message_id, {"is_read": False})
    world.work()                                   # the newer action first
    world.queue.jobs = older                       # then the older one, redelivered late
    events = world.work()
    assert world.row(message_id).is_read is False
    assert world.harness.messages()[message_id].is_read is False, "the user's last action was undone at the provider"
    assert not [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED]
    assert world.queue.jobs == []


def test_an_older_action_keeps_what_no_newer_one_set(outlook: World) -> None:
    """Superseded field by field: the older job still flags, it only leaves 'read' to the newer one."""
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True, "flag_status": "flagged"})
    older = _later(world)
    world.service.update(world.account_id, world.token, message_id, {"is_read": False})
    world.work()
    world.queue.jobs = older
    world.work()
    truth = world.harness.messages()[message_id]
    assert truth.is_read is False and truth.flagged is True
    row = world.row(message_id)
    assert row.is_read is False and row.flag_status.value == "flagged"


def test_an_older_move_redelivered_after_a_newer_one_leaves_the_message_where_the_user_last_put_it(
        outlook: World) -> None:
    world = outlook
    (message_id,) = _inbox(world)
    archive = next(f.folder_id for f in world.mirror.folders.values() if f.role == "archive")
    world.service.update(world.account_id, world.token, message_id, {"folder_id": archive})
    older = _later(world)
    world.service.delete(world.account_id, world.token, message_id, None)       # then to Deleted Items
    trash = next(f.folder_id for f in world.mirror.folders.values() if f.role == "deleteditems")
    world.work()
    world.queue.jobs = older
    world.work()
    assert world.harness.messages()[message_id].folder_id == trash
    assert world.row(message_id).folder_id == trash


def test_a_newer_action_landing_while_the_older_write_is_in_flight_is_written_again(outlook: World) -> None:
    """The check and the write are not atomic: the newer action is accepted, and its job reaches Outlook,
    after the older job checked the ledger but before its write lands. The older job sees the newer claim
    when it reads the ledger again, and writes the newer value once more."""
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True})
    older = _later(world)
    ran: list[bool] = []

    def newer_lands_first(actions) -> None:  # type: ignore[no-untyped-def]
        if ran or not any(a.is_read for a in actions):
            return
        ran.append(True)
        world.service.update(world.account_id, world.token, message_id, {"is_read": False})
        world.work()                                # the newer job runs to the end, inside the older one's call
        assert world.harness.messages()[message_id].is_read is False

    world.factory.before_apply = newer_lands_first
    world.queue.jobs = older
    world.work()
    assert ran
    assert world.harness.messages()[message_id].is_read is False
    assert world.row(message_id).is_read is False


def test_a_failed_older_action_puts_back_only_its_own_field(outlook: World) -> None:
    """The older job fails for good (its destination folder was deleted in Outlook): the folder goes back
    to Outlook's, and the newer action's flag, still pending, stays in the row."""
    world = outlook
    (message_id,) = _inbox(world)
    doomed = world.harness.create_folder("Doomed")
    world.sync()
    world.service.update(world.account_id, world.token, message_id, {"folder_id": doomed})
    older = _later(world)
    world.service.update(world.account_id, world.token, message_id, {"flag_status": "flagged"})
    newer = _later(world)
    world.harness.delete_folder(doomed)               # into Deleted Items,
    world.harness.delete_folder(doomed)               # then for good
    world.queue.jobs = older
    events = world.work()
    assert [m for m in events.messages() if m["target"] == TARGET_ACTIONS_FAILED]
    row = world.row(message_id)
    assert row.folder_id == world.harness.inbox_id and row.flag_status.value == "flagged"
    world.queue.jobs = newer
    world.work()
    assert world.harness.messages()[message_id].flagged is True
    assert world.row(message_id).flag_status.value == "flagged"
