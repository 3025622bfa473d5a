"""The webhook's use case against real Azurite tables and queue: who gets in, what gets enqueued."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from graph_sandbox.rich_notifications import EncryptionCertificate, encrypted_content, validation_token
from graph_sandbox.tokens import TokenSigner
from mailsync.auth.published_keys import SigningKeys
from mailsync.errors import InputError
from mailsync.jobs import JobKind
from mailsync.models import AccountStatus
from mailsync.monitoring.lifecycle import LifecycleReceiver
from mailsync.monitoring.notifications import MAX_SUBSCRIPTIONS, PENDING_STALE_S, NotificationReceiver
from mailsync.monitoring.records import UNKNOWN_FOLDER, UNKNOWN_VERSION, PendingPart
from mailsync.monitoring.resource_data import NotificationKeys, new_certificate_pem, parse_certificates
from mailsync.monitoring.validation_tokens import ValidationTokens
from tests.monitoring.harness import Harness, change, make_harness


@pytest.fixture
def harness(storage_env: dict[str, str]) -> Harness:
    return make_harness(storage_env, NOTIFY_COALESCE_S="0")


def test_an_authentic_notification_enqueues_one_notified_job(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    report = harness.notifications.receive({"value": [change(sub, state, "AAMk1", "created")]})
    assert (report.accepted, report.dropped, report.jobs_enqueued) == (1, 0, 1)
    jobs = harness.drain()
    assert [(j.kind, j.account_id) for j in jobs] == [(JobKind.NOTIFIED.value, account)]
    pending = harness.pending.get(account)
    assert pending is not None and pending.changes == (("created", "AAMk1"),)


def forged_cases(harness: Harness) -> dict[str, dict[str, object]]:
    victim = harness.add_account()
    victim_sub, victim_state = harness.add_subscription(victim)
    attacker = harness.add_account()
    _, attacker_state = harness.add_subscription(attacker)
    return {
        "unknown subscription": {"value": [change("0f6a2c1e-0000-4000-8000-000000000000", victim_state, "m1")]},
        "wrong clientState": {"value": [change(victim_sub, "not-the-client-state", "m1")]},
        "another account's valid clientState": {"value": [change(victim_sub, attacker_state, "m1")]},
        "no clientState": {"value": [change(victim_sub, None, "m1")]},
        "clientState hash instead of clientState": {
            "value": [change(victim_sub, harness.subscriptions.get(victim_sub).client_state_hash, "m1")]},  # type: ignore[union-attr]
        "key injection in the subscription id": {"value": [change(f"{victim_sub}/../x#", victim_state, "m1")]},
        "an id that is not a Graph id": {"value": [change(victim_sub, victim_state, "<script>alert(1)</script>")]},
        "a changeType we never asked for": {"value": [change(victim_sub, victim_state, "m1", "missed")]},
    }


def test_forged_notifications_are_dropped_and_enqueue_nothing(harness: Harness) -> None:
    for name, body in forged_cases(harness).items():
        report = harness.notifications.receive(body)
        assert report.accepted == 0 and report.dropped == 1 and report.jobs_enqueued == 0, name
    assert harness.queued_count() == 0


def test_a_forged_item_does_not_spoil_an_authentic_one_in_the_same_batch(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    report = harness.notifications.receive({"value": [change(sub, "forged", "m1"), change(sub, state, "m2")]})
    assert (report.accepted, report.dropped, report.jobs_enqueued) == (1, 1, 1)
    pending = harness.pending.get(account)
    assert pending is not None and pending.changes == (("updated", "m2"),)


@pytest.mark.parametrize("body", [
    {"value": "not a list"},
    {"value": [{"subscriptionId": 1}]},
    {"data": []},
])
def test_a_malformed_body_is_rejected_whole_even_with_an_authentic_item(harness: Harness, body: dict) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    if isinstance(body.get("value"), list):
        body = {"value": [change(sub, state, "m1"), *body["value"]]}
    with pytest.raises(InputError):
        harness.notifications.receive(body)
    assert harness.queued_count() == 0
    assert harness.pending.get(account) is None


def test_notifications_for_a_deleted_account_enqueue_nothing(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    harness.accounts.delete(account)          # subscription rows left behind on purpose
    report = harness.notifications.receive({"value": [change(sub, state, "m1")]})
    assert report.accepted == 0 and harness.queued_count() == 0


def test_notifications_for_an_account_awaiting_reauthorization_enqueue_nothing(harness: Harness) -> None:
    account = harness.add_account(AccountStatus.REAUTH_REQUIRED)
    sub, state = harness.add_subscription(account)
    harness.notifications.receive({"value": [change(sub, state, "m1")]})
    assert harness.queued_count() == 0


def test_a_replayed_notification_enqueues_nothing_while_the_first_is_pending(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    versioned = {"value": [change(sub, state, "m1", "updated", 'W/"k1"'),
                           change(sub, state, "m3", "created", 'W/"k3"')]}
    harness.notifications.receive(versioned)
    assert harness.queued_count() == 1
    before = harness.pending.get(account)
    for _ in range(5):
        report = harness.notifications.receive(versioned)
        assert report.jobs_enqueued == 0
    after = harness.pending.get(account)
    # Not even rewritten: the same versions are about changes the row's job reads (it takes the row
    # before it reads the mailbox; a repeat arriving after that gets a job of its own: test_handler).
    assert after is not None and before is not None and after.etag == before.etag
    # Without a version (a deletion) a replay cannot be told from a second change once the row is
    # taken: it is written (as a part of the row, no read), and still enqueues nothing.
    unversioned = {"value": [change(sub, state, "m2", "deleted")]}
    for _ in range(3):
        assert harness.notifications.receive(unversioned).jobs_enqueued == 0
    again = harness.pending.get(account)
    assert again is not None and again.etag != before.etag
    assert again.changes == (("updated", "m1"), ("created", "m3"), ("deleted", "m2"))
    assert dict(again.versions) == {"m1": 'W/"k1"', "m3": 'W/"k3"'}
    assert harness.queued_count() == 1


class CountingPending:
    """The real pending store, counting its calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)
        return counted


def test_a_request_finding_the_row_pending_adds_to_it_without_reading_it(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    pending = CountingPending(harness.pending)
    receiver = NotificationReceiver(harness.settings, harness.subscriptions, harness.accounts, pending,  # type: ignore[arg-type]
                                    harness.queue)
    receiver.receive({"value": [change(sub, state, "m1", "updated", 'W/"a1"')]})
    assert pending.calls == ["create"]
    pending.calls.clear()
    receiver.receive({"value": [change(sub, state, "m2", "created", 'W/"b1"'), change(sub, state, "m1", "updated",
                                                                                      'W/"a2"')]})
    receiver.receive({"value": [change(sub, state, "m3", "deleted")]})
    # Was: the refused insert, a read and an ETag replace per request.
    assert pending.calls == ["create", "add", "create", "add"]
    row = harness.pending.get(account)
    assert row is not None and harness.queued_count() == 1
    assert row.changes == (("updated", "m1"), ("created", "m2"), ("deleted", "m3"))
    # m1 came with two versions: the row vouches for neither, as a read-and-replace made it.
    assert dict(row.versions) == {"m1": UNKNOWN_VERSION, "m2": 'W/"b1"'}
    # The job's take is ETag-checked against the row as read, parts included.
    harness.pending.delete(row)
    assert harness.pending.get(account) is None


def test_a_part_for_a_row_taken_meanwhile_inserts_a_new_row_and_job(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    assert harness.pending.add(account, PendingPart((("updated", "m1", None),))) is False, "no row: nothing merged"
    harness.notifications.receive({"value": [change(sub, state, "m1")]})
    harness.drain()
    row = harness.pending.get(account)
    assert row is not None
    harness.pending.delete(row)             # its job took it
    report = harness.notifications.receive({"value": [change(sub, state, "m2")]})
    assert report.jobs_enqueued == 1 and harness.queued_count() == 1


def test_parts_fold_like_a_read_and_replace(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    harness.notifications.receive({"value": [change(sub, state, "m0", "updated", 'W/"0"')]})
    most = harness.settings.notify_max_ids
    for start in range(1, most, 30):
        harness.notifications.receive({"value": [change(sub, state, f"m{n}", "created", f'W/"{n}"')
                                                 for n in range(start, min(start + 30, most))]})
    row = harness.pending.get(account)
    assert row is not None and not row.all_folders and len(row.changes) == harness.settings.notify_max_ids
    # A read-and-replace (what a process that did not see the row's job enqueued does) folds the
    # parts into the row's own fields and drops them; one id more overflows it.
    harness.pending.replace(row)
    assert harness.pending.get(account) == replace(row, etag=harness.pending.get(account).etag)  # type: ignore[union-attr]
    harness.notifications.receive({"value": [change(sub, state, "one-more", "created", 'W/"x"')]})
    overflowed = harness.pending.get(account)
    assert overflowed is not None and overflowed.all_folders and overflowed.changes == () and overflowed.versions == ()
    assert harness.queued_count() == 1


def test_the_row_keeps_each_messages_notified_version_and_forgets_it_once_two_differ(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    harness.notifications.receive({"value": [change(sub, state, "m1", "updated", 'W/"k1"'),
                                             change(sub, state, "m2", "deleted"),
                                             change(sub, state, "m3", "updated")]})
    first = harness.pending.get(account)
    assert first is not None
    # m2: a deletion carries no version (its round looks for the removal); m3 came without one.
    assert dict(first.versions) == {"m1": 'W/"k1"', "m3": UNKNOWN_VERSION}
    harness.notifications.receive({"value": [change(sub, state, "m1", "updated", 'W/"k1"')]})   # a replay
    replayed = harness.pending.get(account)
    assert replayed is not None and replayed.etag == first.etag, "a replay still costs no write"
    # The same message changed again: the row can no longer vouch for either version (they may
    # arrive out of order), so it is rewritten, though the (change type, id) pair is not new.
    harness.notifications.receive({"value": [change(sub, state, "m1", "updated", 'W/"k2"')]})
    again = harness.pending.get(account)
    assert again is not None and again.etag != first.etag
    assert again.changes == first.changes
    assert dict(again.versions)["m1"] == UNKNOWN_VERSION
    assert harness.queued_count() == 1


def test_a_version_tag_that_is_not_tag_shaped_is_ignored_not_refused(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    report = harness.notifications.receive({"value": [change(sub, state, "m1", "updated", "x" * 300),
                                                      change(sub, state, "m2", "updated", "a b")]})
    assert report.accepted == 2 and report.jobs_enqueued == 1
    pending = harness.pending.get(account)
    assert pending is not None and dict(pending.versions) == {"m1": UNKNOWN_VERSION, "m2": UNKNOWN_VERSION}


def test_a_burst_of_1000_notifications_in_batches_becomes_one_job(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    ids = [f"AAMk{i:04d}" for i in range(1000)]
    for start in range(0, 1000, 50):          # Graph (and the sandbox) batch up to 50 per POST
        harness.notifications.receive({"value": [change(sub, state, i, "created") for i in ids[start:start + 50]]})
    assert harness.queued_count() == 1
    pending = harness.pending.get(account)
    # Past NOTIFY_MAX_IDS the row keeps only "sync every folder": bounded size, bounded work.
    assert pending is not None and pending.all_folders and pending.changes == ()


def test_concurrent_requests_for_one_account_enqueue_one_job_and_lose_no_id(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    errors: list[BaseException] = []

    def post(n: int) -> None:
        try:
            harness.notifications.receive({"value": [change(sub, state, f"m{n}-{k}") for k in range(3)]})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert harness.queued_count() == 1
    pending = harness.pending.get(account)
    assert pending is not None
    assert {mid for _, mid in pending.changes} == {f"m{n}-{k}" for n in range(8) for k in range(3)}


def test_a_pending_row_whose_job_was_lost_gets_a_new_job(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    now = [datetime.now(UTC)]
    receiver = NotificationReceiver(harness.settings, harness.subscriptions, harness.accounts, harness.pending,
                                    harness.queue, clock=lambda: now[0])
    receiver.receive({"value": [change(sub, state, "m1")]})
    harness.drain()                           # the job is gone (dead-lettered, say); the row stays
    now[0] += timedelta(seconds=PENDING_STALE_S - 90)
    assert receiver.receive({"value": [change(sub, state, "m2", "updated", 'W/"2"')]}).jobs_enqueued == 0
    assert harness.queued_count() == 0
    # Past the stale threshold the row is read (not added to blindly, not taken for a replay) and
    # gets a new job. (A process that never saw the row reads it anyway: test below.)
    now[0] += timedelta(seconds=91)
    report = receiver.receive({"value": [change(sub, state, "m2", "updated", 'W/"2"')]})
    assert report.jobs_enqueued == 1 and harness.queued_count() == 1
    row = harness.pending.get(account)
    assert row is not None and row.changes == (("updated", "m1"), ("updated", "m2"))


def test_a_row_another_process_created_is_read_before_it_is_added_to(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    harness.notifications.receive({"value": [change(sub, state, "m1")]})
    harness.drain()
    row = harness.pending.get(account)
    assert row is not None
    harness.pending.replace(replace(row, enqueued_at=datetime.now(UTC) - timedelta(seconds=PENDING_STALE_S + 1)))
    pending = CountingPending(harness.pending)
    other = NotificationReceiver(harness.settings, harness.subscriptions, harness.accounts, pending,  # type: ignore[arg-type]
                                 harness.queue)
    report = other.receive({"value": [change(sub, state, "m1")]})
    assert pending.calls == ["create", "get", "replace"]
    assert report.jobs_enqueued == 1 and harness.queued_count() == 1


# --- cost: an anonymous flood must stay cheap ----------------------------------------------------------------------

class CountingAccounts:
    """The real account table, counting the reads the webhook makes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reads: list[str] = []

    def get(self, account_id: str) -> Any:
        self.reads.append(account_id)
        return self._inner.get(account_id)


class CountingSubscriptions:
    """The real subscription table, counting the reads the webhook makes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reads: list[str] = []

    def get(self, subscription_id: str) -> Any:
        self.reads.append(subscription_id)
        return self._inner.get(subscription_id)


def counting_receivers(harness: Harness) -> tuple[CountingSubscriptions, NotificationReceiver, LifecycleReceiver]:
    counting = CountingSubscriptions(harness.subscriptions)
    return (counting,
            NotificationReceiver(harness.settings, counting, harness.accounts, harness.pending, harness.queue),  # type: ignore[arg-type]
            LifecycleReceiver(counting, harness.accounts, harness.queue))  # type: ignore[arg-type]


def forged_ids(n: int) -> list[str]:
    return [f"0f6a2c1e-0000-4000-8000-{i:012d}" for i in range(n)]


def test_a_request_naming_too_many_subscriptions_is_refused_before_any_read(harness: Harness) -> None:
    counting, notifications, lifecycle = counting_receivers(harness)
    ids = forged_ids(MAX_SUBSCRIPTIONS + 1)
    with pytest.raises(InputError, match="more than"):
        notifications.receive({"value": [change(i, "x", f"m{n}") for n, i in enumerate(ids * 400)][:5_000]})
    with pytest.raises(InputError, match="more than"):
        lifecycle.receive({"value": [{"subscriptionId": i, "clientState": "x", "lifecycleEvent": "missed"}
                                     for i in ids]})
    assert counting.reads == [] and harness.queued_count() == 0


def test_a_forged_request_costs_one_read_whatever_it_holds(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account)
    counting, notifications, lifecycle = counting_receivers(harness)
    # 5,000 items over the most subscription ids allowed, the genuine one last.
    ids = [*forged_ids(MAX_SUBSCRIPTIONS - 1), sub]
    flood = {"value": [change(ids[n % len(ids)], state, f"AAMk{n}") for n in range(5_000)]}
    report = notifications.receive(flood)
    assert report.rejected and report.accepted == 0 and report.jobs_enqueued == 0
    assert counting.reads == [ids[0]], "stopped at the first unknown id"
    counting.reads.clear()
    report = lifecycle.receive({"value": [{"subscriptionId": i, "clientState": state, "lifecycleEvent": "missed"}
                                          for i in ids]})
    assert report.rejected and counting.reads == [ids[0]]
    assert harness.queued_count() == 0
    # A genuine request still costs one read per subscription it names, however many items.
    counting.reads.clear()
    report = notifications.receive({"value": [change(sub, state, f"AAMk{n}") for n in range(200)]})
    assert not report.rejected and report.accepted == 200 and counting.reads == [sub]


def test_a_signed_client_state_is_authenticated_without_any_table_read(harness: Harness) -> None:
    account = harness.add_account()
    sub, state = harness.add_subscription(account, signed=True)
    folders_sub, folders_state = harness.add_subscription(account, resource="me/mailFolders", signed=True)
    subscriptions, accounts = CountingSubscriptions(harness.subscriptions), CountingAccounts(harness.accounts)
    receiver = NotificationReceiver(harness.settings, subscriptions, accounts, harness.pending,  # type: ignore[arg-type]
                                    harness.queue, client_states=harness.signer)
    folder_item = {**change(folders_sub, folders_state, "AAMk2"), "resource": "Users/u/MailFolders/f1"}
    report = receiver.receive({"value": [change(sub, state, "AAMk1", "created"), folder_item]})
    assert (report.accepted, report.dropped, report.jobs_enqueued) == (2, 0, 1)
    assert subscriptions.reads == [] and accounts.reads == []
    pending = harness.pending.get(account)
    assert pending is not None and pending.changes == (("created", "AAMk1"),) and pending.folder_notices == 1


def test_forged_signed_client_states_are_dropped_without_any_read(harness: Harness) -> None:
    from mailsync.monitoring.client_state import ClientStates
    from mailsync.monitoring.records import SubscriptionKind

    victim = harness.add_account()
    sub, state = harness.add_subscription(victim, signed=True)
    elsewhere = ClientStates([("test1", b"k" * 32)]).new(victim, SubscriptionKind.MESSAGES)  # another key
    attacker = harness.add_account()
    retargeted = harness.signer.new(attacker, SubscriptionKind.MESSAGES).replace(attacker, victim)
    subscriptions, accounts = CountingSubscriptions(harness.subscriptions), CountingAccounts(harness.accounts)
    receiver = NotificationReceiver(harness.settings, subscriptions, accounts, harness.pending,  # type: ignore[arg-type]
                                    harness.queue, client_states=harness.signer)
    flipped = state[:-1] + ("A" if state[-1] != "A" else "B")
    for forged in (elsewhere, retargeted, flipped, state.replace(".m.", ".f.")):
        report = receiver.receive({"value": [change(sub, forged, "m1")]})
        assert report.accepted == 0 and report.dropped == 1, forged
    # Unknown subscription ids do not matter to a signed state: nothing was looked up.
    report = receiver.receive({"value": [change(i, elsewhere, "m1") for i in forged_ids(MAX_SUBSCRIPTIONS)]})
    assert report.accepted == 0 and not report.rejected
    assert subscriptions.reads == [] and accounts.reads == [] and harness.queued_count() == 0


def test_a_state_signed_under_a_dropped_key_is_checked_against_its_subscription_row(harness: Harness) -> None:
    # A renewal keeps a subscription's clientState: dropping the key it was signed under must not
    # drop its notifications; they are checked the old way, against the stored hash.
    from mailsync.monitoring.client_state import ClientStates
    from mailsync.monitoring.records import Subscription, SubscriptionKind
    from mailsync.security.secrets import hash_secret

    account = harness.add_account()
    old_state = ClientStates([("retired", b"r" * 32)]).new(account, SubscriptionKind.MESSAGES)
    sub = "0f6a2c1e-0000-4000-8000-00000000feed"
    now = datetime.now(UTC)
    harness.subscriptions.put(Subscription(sub, account, hash_secret(old_state), now + timedelta(days=2), now))
    subscriptions = CountingSubscriptions(harness.subscriptions)
    receiver = NotificationReceiver(harness.settings, subscriptions, harness.accounts, harness.pending,  # type: ignore[arg-type]
                                    harness.queue, client_states=harness.signer)
    report = receiver.receive({"value": [change(sub, old_state, "m1")]})
    assert (report.accepted, report.jobs_enqueued) == (1, 1) and subscriptions.reads == [sub]
    # A forged state under an unknown key id costs what any forged request costs: one read, then nothing.
    forged = old_state.replace(".retired.", ".gone.")
    report = receiver.receive({"value": [change(sub, forged, "m2")]})
    assert report.accepted == 0 and report.dropped == 1


def test_the_folder_of_new_mail_comes_from_resource_data_whose_tokens_check_out(harness: Harness) -> None:
    """Rich notifications: a created item's encrypted parentFolderId goes into the row (no lookup needed);
    updated items are not decrypted (the store knows their folder); a POST whose validation tokens fail
    keeps its notifications but not their resource data."""
    keys = NotificationKeys(parse_certificates(new_certificate_pem("test")))
    identity = TokenSigner()
    app = harness.settings.ms_client_id
    assert app is not None
    receiver = NotificationReceiver(harness.settings, harness.subscriptions, harness.accounts, harness.pending,
                                    harness.queue, client_states=harness.signer, keys=keys,
                                    tokens=ValidationTokens(app, SigningKeys(identity.jwks)))
    account = harness.add_account()
    sub, state = harness.add_subscription(account, signed=True)
    certificate = EncryptionCertificate(keys.current.certificate_id, base64.b64decode(keys.current.certificate))

    def rich(message_id: str, folder: str, change_type: str = "created", version: str = 'W/"k1"') -> dict[str, Any]:
        item = change(sub, state, message_id, change_type, version)
        item["tenantId"] = "tenant-1"
        item["encryptedContent"] = encrypted_content({"id": message_id, "parentFolderId": folder}, certificate)
        return item

    token = validation_token(identity, app_id=app, tenant_id="tenant-1", now=time.time())
    report = receiver.receive({"value": [rich("m1", "F1"), rich("m2", "F2", "updated")], "validationTokens": [token]})
    assert report.accepted == 2 and report.jobs_enqueued == 1
    first = harness.pending.get(account)
    assert first is not None and dict(first.folders) == {"m1": "F1"}

    stranger = TokenSigner()     # a token Microsoft's keys do not verify
    forged = validation_token(stranger, app_id=app, tenant_id="tenant-1", now=time.time())
    receiver.receive({"value": [rich("m3", "F3")], "validationTokens": [forged]})
    receiver.receive({"value": [rich("m4", "F4")]})                   # no tokens at all
    # Created again elsewhere (another version: the same one would be a replay of the same state).
    receiver.receive({"value": [rich("m1", "F9", version='W/"k2"')], "validationTokens": [token]})
    pending = harness.pending.get(account)
    assert pending is not None
    assert {mid for _, mid in pending.changes} == {"m1", "m2", "m3", "m4"}      # every notification kept
    assert dict(pending.folders) == {"m1": UNKNOWN_FOLDER, "m3": UNKNOWN_FOLDER, "m4": UNKNOWN_FOLDER}
    assert harness.queued_count() == 1
