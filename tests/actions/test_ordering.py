"""ACTION jobs run out of order: the queue redelivers an older job, or retries it after a 429, after a newer one ran.

Known bug (docs/actions.md, Known gaps): the older action is applied last,
so Outlook ends with it; the store's optimistic row of the newer action is
then overwritten by the next delta round (its version is newer), and the
user's last action is gone without an ``actionsFailed``. Nothing in the
store tells a later action's optimistic row from a delta page written after
the action's time, so the job cannot tell "superseded" from "corrected by
Outlook"; a fix needs the action's version kept with the row (or
conditional PATCHes). Strict: when it passes, remove the mark.
"""

from __future__ import annotations

import pytest

from tests.actions.test_service import World, _inbox, outlook  # noqa: F401  (the fixture)


@pytest.mark.xfail(strict=True, reason="an older ACTION job run after a newer one undoes it at Outlook (known gap)")
def test_an_older_action_redelivered_after_a_newer_one_does_not_undo_it(outlook: World) -> None:  # noqa: F811
    world = outlook
    (message_id,) = _inbox(world, is_read=False)
    world.service.update(world.account_id, world.token, message_id, {"is_read": True})
    older, world.queue.jobs = world.queue.jobs, []
    world.service.update(world.account_id, world.token, message_id, {"is_read": False})
    world.work()                                   # the newer action first
    world.queue.jobs = older                       # then the older one, redelivered late
    world.work()
    assert world.row(message_id).is_read is False
    assert world.harness.messages()[message_id].is_read is False, "the user's last action was undone at Outlook"
