"""Notified states: the webhook writes the state a rich notification carries and tells the page; delta confirms.

Real Azurite (the pending row, the queue) and the real search node; the
notifications are made as Graph (the sandbox's encryption and validation
tokens) makes them; only the SignalR service is replaced by a recorder of
what the webhook sends to it (mailsync.monitoring.notified_states).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from graph_sandbox.rich_notifications import EncryptionCertificate, encrypted_content, validation_token
from graph_sandbox.tokens import TokenSigner
from mailsync.auth.published_keys import SigningKeys
from mailsync.models import AccountStatus, Folder, Mailbox, Message, Provider
from mailsync.monitoring.notifications import CONFIRM_MARGIN_S, CONFIRM_MIN_LAG_S, NotificationReceiver
from mailsync.monitoring.notified_states import NotifiedStates
from mailsync.monitoring.resource_data import NotificationKeys, new_certificate_pem, parse_certificates
from mailsync.monitoring.validation_tokens import ValidationTokens
from mailsync.providers.graph import map_message
from mailsync.store.documents import mailbox_doc_id
from mailsync.store.notified_writes import NotifiedWrite
from mailsync.store.search_store import SearchStore
from tests.monitoring.harness import Harness, change, make_harness

INBOX, ARCHIVE = "AAMkInbox=", "AAMkArchive="


@dataclass
class Recorder:
    """The SignalR service's REST API as the webhook sees it: what it was sent."""

    sent: list[Mapping[str, Any]] = field(default_factory=list)

    def send(self, messages: Sequence[Mapping[str, Any]]) -> None:
        self.sent.extend(messages)

    def told(self) -> list[tuple[str, str, int]]:
        """(message id, folder, version) of every upsert the page was told, in order."""
        return [(row["message_id"], row["folder_id"], row["version"]) for message in self.sent
                if message["target"] == "messagesChanged" for row in message["arguments"][0]["upserted"]]

    def told_removed(self) -> list[tuple[str, str]]:
        """(folder, message id) of every removal the page was told, in order."""
        return [(row["folder_id"], row["message_id"]) for message in self.sent
                if message["target"] == "messagesChanged" for row in message["arguments"][0]["removed"]]


@dataclass
class Rig:
    harness: Harness
    store: SearchStore
    live: Recorder
    receiver: NotificationReceiver
    keys: NotificationKeys
    identity: TokenSigner

    def account(self, status: AccountStatus = AccountStatus.SYNCED, *, mailbox: bool = True) -> tuple[str, str, str]:
        """An account with a signed subscription, its mailbox document (``status``) and two folders."""
        account_id = self.harness.add_account()
        if mailbox:
            self.store.upsert_mailbox(Mailbox(account_id, "a@x.io", "A", Provider.OUTLOOK, status))
            self.store.upsert_folders([Folder(account_id, INBOX, "Inbox"), Folder(account_id, ARCHIVE, "Archive")])
        sub, state = self.harness.add_subscription(account_id, signed=True)
        return account_id, sub, state

    def post(self, sub: str, state: str, *items: tuple[str, str, dict[str, Any] | None],
             tamper: bool = False) -> None:
        """One POST of (change type, message id, resource or None) items, as Graph sends it."""
        certificate = EncryptionCertificate(self.keys.current.certificate_id,
                                            base64.b64decode(self.keys.current.certificate))
        value = []
        for change_type, message_id, resource in items:
            item = change(sub, state, message_id, change_type, f'W/"{time.monotonic_ns()}"')
            item["tenantId"] = "tenant-1"
            if resource is not None:
                item["encryptedContent"] = encrypted_content(resource, certificate)
                if tamper:
                    data = bytearray(base64.b64decode(item["encryptedContent"]["data"]))
                    data[-1] ^= 1
                    item["encryptedContent"]["data"] = base64.b64encode(bytes(data)).decode()
            value.append(item)
        app = self.harness.settings.ms_client_id
        assert app is not None
        token = validation_token(self.identity, app_id=app, tenant_id="tenant-1", now=time.time())
        self.receiver.receive({"value": value, "validationTokens": [token]})

    def stored(self, account_id: str, message_id: str) -> Message | None:
        return self.store.get_message(account_id, message_id)


def receiver_for(harness: Harness, keys: NotificationKeys, identity: TokenSigner,
                 states: NotifiedStates | None, queue: Any = None) -> NotificationReceiver:
    app = harness.settings.ms_client_id
    assert app is not None
    return NotificationReceiver(harness.settings, harness.subscriptions, harness.accounts, harness.pending,
                                queue or harness.queue, client_states=harness.signer, keys=keys,
                                tokens=ValidationTokens(app, SigningKeys(identity.jwks)), states=states)


@pytest.fixture
def rig(storage_env: dict[str, str], store: SearchStore) -> Rig:
    harness = make_harness(storage_env, NOTIFY_COALESCE_S="0")
    keys = NotificationKeys(parse_certificates(new_certificate_pem("test")))
    identity = TokenSigner()
    live = Recorder()
    states = NotifiedStates(lambda: store, lambda: live)
    return Rig(harness, store, live, receiver_for(harness, keys, identity, states), keys, identity)


def resource(message_id: str, modified: datetime, *, folder: str = INBOX, is_read: bool = False,
             subject: str = "Lunch?") -> dict[str, Any]:
    """A message as the subscription's $select shows it (every list property, no body)."""
    return {
        "@odata.type": "#Microsoft.Graph.Message", "@odata.etag": 'W/"CQ"', "id": message_id,
        "parentFolderId": folder, "subject": subject,
        "from": {"emailAddress": {"name": "Ann", "address": "ann@x.io"}},
        "toRecipients": [{"emailAddress": {"name": "A", "address": "a@x.io"}}], "ccRecipients": [],
        "receivedDateTime": "2026-12-01T08:00:00Z", "sentDateTime": "2026-12-01T08:00:00Z",
        "lastModifiedDateTime": modified.strftime("%Y-%m-%dT%H:%M:%SZ"), "isRead": is_read,
        "flag": {"flagStatus": "notFlagged"}, "importance": "normal", "categories": [], "hasAttachments": False,
        "conversationId": "c1", "internetMessageId": "<1@x.io>", "bodyPreview": "see you", "isDraft": False,
    }


def delta_reads(account_id: str, item: dict[str, Any], at: datetime, body: str | None = None) -> Message:
    """The message as a delta round maps it, read at ``at`` (its version carries the read offset)."""
    with_body = {**item, "body": {"contentType": "text", "content": body}} if body is not None else item
    return map_message(with_body, account_id, item["parentFolderId"], 32_000 if body is not None else None,
                       observed_ms=int(at.timestamp() * 1000))


def now_second() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def test_a_change_reaches_the_store_and_the_page_from_the_webhook_before_any_round(rig: Rig) -> None:
    account, sub, state = rig.account()
    before = now_second() - timedelta(seconds=5)
    rig.store.upsert_messages([delta_reads(account, resource("m1", before), before)])
    modified = now_second()
    rig.post(sub, state, ("updated", "m1", resource("m1", modified, is_read=True)))
    stored = rig.stored(account, "m1")
    assert stored is not None and (stored.folder_id, stored.subject, stored.is_read) == (INBOX, "Lunch?", True)
    floor = int(modified.timestamp()) * 1000
    assert stored.version == floor, "the floor of its second: delta's reading of it replaces it"
    assert rig.live.told() == [("m1", INBOX, floor)]
    pending = rig.harness.pending.get(account)
    assert pending is not None and [mid for _, mid in pending.changes] == ["m1"], "delta still confirms it"
    assert rig.harness.queued_count() == 1

    confirmed = delta_reads(account, resource("m1", modified, is_read=True), modified + timedelta(milliseconds=1))
    assert rig.store.upsert_messages([confirmed]).written == 1, "delta's reading of the same state wins"


def test_new_mail_is_told_to_the_page_at_once_and_left_to_delta_in_the_store(rig: Rig) -> None:
    """A created message the store does not hold is only announced: a copy written from a notification could
    outlive it (created and deleted between two rounds, its ``created`` delivered after the round that read
    the deletion: no row, no tombstone, and no delta round would ever list it), while delta's round brings
    new mail in anyway."""
    account, sub, state = rig.account()
    modified = now_second()
    rig.post(sub, state, ("created", "m1", resource("m1", modified)))
    assert rig.live.told() == [("m1", INBOX, int(modified.timestamp()) * 1000)]
    assert rig.stored(account, "m1") is None
    pending = rig.harness.pending.get(account)
    assert pending is not None and dict(pending.folders) == {"m1": INBOX}, "its round needs no lookup"


def test_a_stale_notified_state_after_deltas_newer_state_does_not_win(rig: Rig) -> None:
    account, sub, state = rig.account()
    old = now_second() - timedelta(seconds=2)
    newer = old + timedelta(seconds=1)
    rig.store.upsert_messages([delta_reads(account, resource("m1", newer, is_read=True), newer)])
    rig.post(sub, state, ("updated", "m1", resource("m1", old, is_read=False)))
    stored = rig.stored(account, "m1")
    assert stored is not None and stored.is_read, "the newer state stays"
    assert rig.live.told() == [], "the page is not told an older state"


def test_two_changes_in_one_second_out_of_order_converge_after_delta(rig: Rig) -> None:
    account, sub, state = rig.account()
    second = now_second()
    rig.store.upsert_messages([delta_reads(account, resource("m1", second - timedelta(seconds=3)),
                                           second - timedelta(seconds=3))])
    read_then_flagged = {**resource("m1", second, is_read=True), "flag": {"flagStatus": "flagged"}}
    rig.post(sub, state, ("updated", "m1", read_then_flagged))                  # the newer one first
    rig.post(sub, state, ("updated", "m1", resource("m1", second, is_read=True)))  # then the older
    stored = rig.stored(account, "m1")
    assert stored is not None and stored.flag_status.value == "notFlagged", "a tie: the later write shows"
    rig.store.upsert_messages([delta_reads(account, read_then_flagged, second + timedelta(milliseconds=400))])
    stored = rig.stored(account, "m1")
    assert stored is not None and stored.flag_status.value == "flagged", "delta's reading of the newest wins"


def test_a_body_stored_before_is_kept_and_a_resyncs_epoch_too(rig: Rig) -> None:
    account, sub, state = rig.account()
    before = now_second() - timedelta(seconds=5)
    rig.store.upsert_messages([delta_reads(account, resource("m1", before), before, body="The whole text")], epoch=7)
    modified = now_second()
    rig.post(sub, state, ("updated", "m1", resource("m1", modified, is_read=True)))
    stored = rig.stored(account, "m1")
    assert stored is not None and stored.is_read and stored.body_text == "The whole text"
    # A resync of epoch 7 that saw it keeps it (remove_stale deletes what is below its epoch).
    rig.store.remove_stale(account, INBOX, 7)
    assert rig.stored(account, "m1") is not None


def test_a_move_lands_in_its_new_folder_and_a_deletion_is_told_to_the_page_but_left_in_the_store(
        rig: Rig) -> None:
    account, sub, state = rig.account()
    before = now_second() - timedelta(seconds=5)
    rig.store.upsert_messages([delta_reads(account, resource(m, before), before) for m in ("m1", "m2")])
    modified = now_second()
    # Immutable ids: a move is "deleted" then "created" for the same id; the last word wins.
    rig.post(sub, state, ("deleted", "m1", None), ("created", "m1", resource("m1", modified, folder=ARCHIVE)),
             ("updated", "m2", resource("m2", modified, is_read=True)), ("deleted", "m2", None))
    moved, deleted = rig.stored(account, "m1"), rig.stored(account, "m2")
    assert moved is not None and moved.folder_id == ARCHIVE
    assert deleted is not None and not deleted.is_read, "a deletion is the round's to write"
    assert [mid for mid, _, _ in rig.live.told()] == ["m1"]
    assert rig.live.told_removed() == [(INBOX, "m2")], "the page drops the row it shows in the folder the store says"
    rig.post(sub, state, ("deleted", "m9", None))
    assert rig.live.told_removed() == [(INBOX, "m2")], "nothing to tell of a message the store does not hold"


def test_an_update_of_a_message_the_store_does_not_hold_is_left_to_delta(rig: Rig) -> None:
    account, sub, state = rig.account()
    rig.post(sub, state, ("updated", "m1", resource("m1", now_second())))
    assert rig.stored(account, "m1") is None and rig.live.told() == []


@pytest.mark.parametrize("case", ["unknown account", "initial sync running", "tampered data", "unknown folder",
                                  "folder-only select", "old created"])
def test_notifications_that_must_not_be_taken_as_state_write_nothing(rig: Rig, case: str) -> None:
    """A move's ``created`` (the store holds the message in the Inbox) that must change nothing."""
    status = AccountStatus.SYNCING if case == "initial sync running" else AccountStatus.SYNCED
    account, sub, state = rig.account(status, mailbox=case != "unknown account")
    before = now_second() - timedelta(seconds=90)
    rig.store.upsert_messages([delta_reads(account, resource("m1", before), before)])
    held = rig.stored(account, "m1")
    modified = now_second() - timedelta(seconds=60) if case == "old created" else now_second()
    item: dict[str, Any] = resource("m1", modified, folder="AAMkElsewhere=" if case == "unknown folder" else ARCHIVE)
    if case == "folder-only select":
        item = {"id": "m1", "parentFolderId": ARCHIVE}
    rig.post(sub, state, ("created", "m1", item), tamper=case == "tampered data")
    assert rig.stored(account, "m1") == held and rig.live.told() == []
    pending = rig.harness.pending.get(account)
    assert pending is not None and [mid for _, mid in pending.changes] == ["m1"], "the notification still counts"


def test_an_account_unlinked_while_the_webhook_wrote_keeps_nothing(rig: Rig) -> None:
    account, sub, state = rig.account()

    class UnlinkedAfterTheWrite:
        """The store as an unlink racing the webhook leaves it: the write lands after the unlink deleted the
        messages, and the mailbox document is gone when the webhook looks again."""

        def __getattr__(self, name: str) -> Any:
            return getattr(rig.store, name)

        def write_notified(self, account_id: str, messages: Sequence[Message], **options: Any) -> NotifiedWrite:
            done = rig.store.write_notified(account_id, messages, **options)
            assert done.written, "written; the unlink had deleted the messages already, now the mailbox"
            rig.store.engine.delete_document(rig.store.names.mailboxes, mailbox_doc_id(account), routing=account,
                                             refresh=True)
            return done

    before = now_second() - timedelta(seconds=5)
    rig.store.upsert_messages([delta_reads(account, resource("m1", before), before)])
    states = NotifiedStates(UnlinkedAfterTheWrite, lambda: rig.live)
    rig.receiver = receiver_for(rig.harness, rig.keys, rig.identity, states)
    rig.post(sub, state, ("updated", "m1", resource("m1", now_second(), is_read=True)))
    assert rig.stored(account, "m1") is None and rig.live.told() == []


def rig_with_delays(storage_env: dict[str, str], store: SearchStore, **settings: str) -> tuple[Rig, list[float]]:
    """A rig whose receiver enqueues on the real queue through a spy: the delay each enqueue asked for, in order."""
    harness = make_harness(storage_env, **settings)
    delays: list[float] = []

    class Spy:
        def enqueue(self, job: Any, *, delay_s: float = 0.0) -> None:
            delays.append(delay_s)
            harness.queue.enqueue(job, delay_s=delay_s)

    keys = NotificationKeys(parse_certificates(new_certificate_pem("test")))
    identity, live = TokenSigner(), Recorder()
    states = NotifiedStates(lambda: store, lambda: live)
    return Rig(harness, store, live, receiver_for(harness, keys, identity, states, Spy()), keys, identity), delays


def test_the_job_confirming_told_states_is_held_past_the_lag_and_an_untold_one_is_not(
        storage_env: dict[str, str], store: SearchStore) -> None:
    """The page already shows a told state: its NOTIFIED job only confirms it, so it is held a second past the
    learnt lag (counted as at least 1 s) through the queue's visibility, with no thread waiting; a job for
    notifications the page was not told of keeps ``NOTIFY_COALESCE_S`` (here 0)."""
    rig, delays = rig_with_delays(storage_env, store, NOTIFY_COALESCE_S="0")
    _, sub, state = rig.account()
    _, other_sub, other_state = rig.account(AccountStatus.SYNCING)
    rig.post(sub, state, ("created", "m1", resource("m1", now_second())))
    rig.post(other_sub, other_state, ("created", "m1", resource("m1", now_second())))
    assert [mid for mid, _, _ in rig.live.told()] == ["m1"], "the synced account's page only"
    assert delays == [CONFIRM_MIN_LAG_S + CONFIRM_MARGIN_S, 0.0]


def test_a_job_only_confirming_stored_states_waits_longer_and_new_mail_merged_into_its_row_gets_its_own(
        storage_env: dict[str, str], store: SearchStore) -> None:
    """An update the store now holds needs only delta's confirmation: its job waits ``NOTIFY_CONFIRM_S``. New mail
    merged into that row (announced, not stored) must not wait as long: it gets a job at the told delay; a second
    update merged after it needs none (the row's job is due in time)."""
    rig, delays = rig_with_delays(storage_env, store, NOTIFY_COALESCE_S="0", NOTIFY_CONFIRM_S="12")
    account, sub, state = rig.account()
    before = now_second() - timedelta(seconds=5)
    rig.store.upsert_messages([delta_reads(account, resource(m, before), before) for m in ("m1", "m2")])
    rig.post(sub, state, ("updated", "m1", resource("m1", now_second(), is_read=True)))
    rig.post(sub, state, ("created", "new", resource("new", now_second())))
    rig.post(sub, state, ("updated", "m2", resource("m2", now_second(), is_read=True)))
    assert delays == [12.0, CONFIRM_MIN_LAG_S + CONFIRM_MARGIN_S]
    assert {mid for mid, _, _ in rig.live.told()} == {"m1", "new", "m2"}


def test_what_a_post_costs_the_webhook_with_and_without_notified_states(rig: Rig) -> None:
    """Printed, never asserted: CPU of this process (the webhook's code, its clients and crypto; not Azurite's or
    the node's) per POST of one ``updated`` item, with notified states and without them (the folder only)."""
    account, sub, state = rig.account()
    before = now_second() - timedelta(seconds=5)
    ids = [f"m{n}" for n in range(40)]
    rig.store.upsert_messages([delta_reads(account, resource(m, before), before) for m in ids])
    without = receiver_for(rig.harness, rig.keys, rig.identity, None)
    figures = {}
    for name, receiver in (("without", without), ("with", rig.receiver), ("without again", without)):
        rig.receiver = receiver
        cpu, wall = time.process_time(), time.perf_counter()
        for n, message_id in enumerate(ids):
            rig.post(sub, state, ("updated", message_id, resource(message_id, now_second(), is_read=n % 2 == 0)))
        figures[name] = (1000 * (time.process_time() - cpu) / len(ids), 1000 * (time.perf_counter() - wall) / len(ids))
    assert len(rig.live.told()) >= len(ids), "every POST of the 'with' run told the page"
    print("\nwebhook per POST of one updated item (CPU ms / wall ms, including the test's own encryption): "
          + ", ".join(f"{name} {cpu:.1f} / {wall:.1f}" for name, (cpu, wall) in figures.items()))
