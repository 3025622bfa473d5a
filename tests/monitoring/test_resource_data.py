"""Rich notifications, product side: our certificates, opening Graph's encryptedContent, its validation tokens.

Graph's side is the sandbox's (graph_sandbox.rich_notifications, written
from Microsoft's documentation and checked there by decrypting with the
documented steps): what the product must open and check is what it makes.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from graph_sandbox.rich_notifications import PUBLISHER_APP_ID, EncryptionCertificate, encrypted_content
from graph_sandbox.rich_notifications import validation_token as sandbox_token
from graph_sandbox.tokens import TokenSigner
from mailsync.auth.published_keys import SigningKeys
from mailsync.errors import ConfigurationError, InputError
from mailsync.monitoring.resource_data import (
    NotificationKeys,
    dev_certificate,
    load_notification_keys,
    new_certificate_pem,
    notified_message,
    parent_folder,
    parse_certificates,
)
from mailsync.monitoring.validation_tokens import ValidationTokens
from mailsync.settings import Settings

APP = "3f8e2a6c-51d4-4b7e-9c0a-6d2b1e7f4a93"
TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"


@pytest.fixture(scope="module")
def pem() -> bytes:
    return new_certificate_pem("test")


@pytest.fixture(scope="module")
def keys(pem: bytes) -> NotificationKeys:
    return NotificationKeys(parse_certificates(pem))


def graph_encrypts(keys: NotificationKeys, resource: dict[str, Any]) -> dict[str, Any]:
    """What Graph puts into a notification for our current certificate (the sandbox's implementation)."""
    current = keys.current
    return encrypted_content(resource, EncryptionCertificate(current.certificate_id,
                                                             base64.b64decode(current.certificate)))


def test_graph_encrypted_content_opens_with_our_key(keys: NotificationKeys) -> None:
    content = graph_encrypts(keys, {"id": "m1", "parentFolderId": "AAMkF=="})
    assert content["encryptionCertificateId"] == keys.current.certificate_id
    resource = keys.decrypt(content)
    assert parent_folder(resource, "m1") == "AAMkF=="


@pytest.mark.parametrize("tamper", ["signature", "data", "certificate", "key"])
def test_altered_or_foreign_content_is_refused(keys: NotificationKeys, tamper: str) -> None:
    content = graph_encrypts(keys, {"id": "m1", "parentFolderId": "F"})
    if tamper == "signature":
        content["dataSignature"] = base64.b64encode(b"\0" * 32).decode()
    elif tamper == "data":
        data = bytearray(base64.b64decode(content["data"]))
        data[0] ^= 1
        content["data"] = base64.b64encode(bytes(data)).decode()
    elif tamper == "certificate":
        content["encryptionCertificateId"] = "not ours"
    else:
        other = NotificationKeys(parse_certificates(new_certificate_pem("other")))
        content = {**graph_encrypts(other, {"id": "m1"}), "encryptionCertificateId": keys.current.certificate_id}
    with pytest.raises(InputError):
        keys.decrypt(content)


def test_a_resource_about_another_message_or_without_a_graph_id_names_no_folder() -> None:
    assert parent_folder({"id": "m2", "parentFolderId": "F"}, "m1") is None
    assert parent_folder({"parentFolderId": "F"}, "m1") == "F"
    assert parent_folder({"id": "m1", "parentFolderId": "a b"}, "m1") is None
    assert parent_folder({"id": "m1"}, "m1") is None


NOTIFIED = {
    "@odata.type": "#Microsoft.Graph.Message", "@odata.etag": 'W/"CQAAAB"', "id": "m1",
    "parentFolderId": "AAMkInbox=", "subject": "Lunch?", "from": {"emailAddress": {"name": "Ann", "address": "a@x.io"}},
    "toRecipients": [{"emailAddress": {"name": "Bo", "address": "b@x.io"}}], "ccRecipients": [],
    "receivedDateTime": "2026-12-02T09:00:00Z", "sentDateTime": "2026-12-02T08:59:59Z",
    "lastModifiedDateTime": "2026-12-02T09:00:07Z", "isRead": True, "flag": {"flagStatus": "flagged"},
    "importance": "high", "categories": ["Blue"], "hasAttachments": False, "conversationId": "c1",
    "internetMessageId": "<1@x.io>", "bodyPreview": "see you", "isDraft": False,
}


def test_a_resource_with_the_selected_properties_is_the_messages_state_at_the_floor_of_its_second() -> None:
    message = notified_message(NOTIFIED, "m1", "acc")
    assert message is not None
    assert (message.folder_id, message.subject, message.is_read, message.body_text) == \
        ("AAMkInbox=", "Lunch?", True, None)
    assert message.version == 1_796_202_007_000, "lastModifiedDateTime's second, no read-time offset"
    assert message.sender is not None and message.sender.address == "a@x.io"


@pytest.mark.parametrize("resource", [
    {"id": "m1", "parentFolderId": "AAMkInbox="},                          # an older subscription's $select
    {**NOTIFIED, "id": "m2"},                                             # about another message
    {k: v for k, v in NOTIFIED.items() if k != "isRead"},                 # a property missing
    {**NOTIFIED, "lastModifiedDateTime": "yesterday"},                    # not Graph's form
    {**NOTIFIED, "lastModifiedDateTime": "2026-12-02T09:00:07"},          # no zone: no instant
    {**NOTIFIED, "flag": "flagged"},                                      # a flag of another shape
])
def test_a_resource_that_does_not_show_the_whole_state_gives_no_message(resource: dict[str, Any]) -> None:
    assert notified_message(resource, "m1", "acc") is None


def test_certificates_pair_with_their_keys_in_any_order_and_the_first_certificate_is_current() -> None:
    old, new = new_certificate_pem("old"), new_certificate_pem("new")
    key_old, cert_old = old.split(b"-----BEGIN CERTIFICATE-----")
    key_new, cert_new = new.split(b"-----BEGIN CERTIFICATE-----")
    # New certificate first (current), the old one still listed for notifications encrypted before the rotation.
    text = key_old + b"-----BEGIN CERTIFICATE-----" + cert_new + key_new + b"-----BEGIN CERTIFICATE-----" + cert_old
    parsed = parse_certificates(text)
    rotated = NotificationKeys(parsed)
    assert rotated.current == parse_certificates(new)[0]
    before = graph_encrypts(NotificationKeys(parse_certificates(old)), {"id": "m", "parentFolderId": "F"})
    assert parent_folder(rotated.decrypt(before), "m") == "F"


def test_the_setting_may_be_one_line_of_base64_of_the_pem(pem: bytes) -> None:
    assert parse_certificates(base64.b64encode(pem).decode()) == parse_certificates(pem)


@pytest.mark.parametrize("text", [b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                  b"not base64 !"])
def test_unusable_certificate_settings_are_configuration_errors(text: bytes) -> None:
    with pytest.raises(ConfigurationError):
        parse_certificates(text)


def test_a_certificate_without_its_private_key_is_refused(pem: bytes) -> None:
    certificate_only = pem[pem.index(b"-----BEGIN CERTIFICATE-----"):]
    with pytest.raises(ConfigurationError, match="no private key"):
        parse_certificates(certificate_only + new_certificate_pem("other").split(b"-----BEGIN CERTIFICATE")[0])


def test_sandbox_mode_makes_one_development_certificate_real_microsoft_needs_one(tmp_path: Path) -> None:
    sandbox = Settings.from_env({"MAILSYNC_LOCAL_DIR": str(tmp_path)})
    first, again = load_notification_keys(sandbox), load_notification_keys(sandbox)
    assert first is not None and again is not None
    assert first.current.certificate_id == again.current.certificate_id     # created once, then shared
    assert dev_certificate(tmp_path) == (tmp_path / "notification-certificate.pem").read_bytes()
    real = Settings.from_env({"MS_CLIENT_ID": "app", "MS_CLIENT_SECRET": "s", "MAILSYNC_LOCAL_DIR": str(tmp_path)})
    assert load_notification_keys(real) is None           # no rich notifications: the lookups, as before
    configured = Settings.from_env({"MS_CLIENT_ID": "app", "MS_CLIENT_SECRET": "s",
                                    "NOTIFICATION_CERTIFICATES": new_certificate_pem("x")
                                    .decode()})
    assert load_notification_keys(configured) is not None


# -- validation tokens -------------------------------------------------------------------------


class Identity:
    """The identity platform's signing key, published as a JWKS (the sandbox's)."""

    def __init__(self) -> None:
        self.signer = TokenSigner()
        self.fetches = 0

    def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        return self.signer.jwks()


def checker(identity: Identity, now: float = 1_000_000.0) -> ValidationTokens:
    return ValidationTokens(APP, SigningKeys(identity.fetch), clock=lambda: now)


def test_graphs_validation_tokens_are_accepted_and_remembered() -> None:
    identity = Identity()
    token = sandbox_token(identity.signer, app_id=APP, tenant_id=TENANT, now=1_000_000.0)
    tokens = checker(identity)
    assert tokens.verify([token], {TENANT})
    assert tokens.verify([token], {TENANT})
    assert identity.fetches == 1                      # keys cached


@pytest.mark.parametrize("claims", [
    {"aud": "another app"},                          # not issued for us
    {"appid": "11111111-2222-3333-4444-555555555555"},   # not Graph's change-notification publisher
    {"iss": "https://sts.windows.net/another/"},     # not the identity platform's issuer for its tenant
    {"exp": 1_000_000 - 400},                       # expired (beyond the clock-skew leeway)
    {"nbf": 1_000_000 + 400},                       # not valid yet
])
def test_tokens_breaking_microsofts_rules_are_refused(claims: dict[str, Any]) -> None:
    identity = Identity()
    token = sandbox_token(identity.signer, app_id=APP, tenant_id=TENANT, now=1_000_000.0)
    _, body, _ = token.split(".")
    payload = {**_claims(body), **claims}
    forged = identity.signer.sign(payload)            # properly signed, wrong claims
    assert not checker(identity).verify([forged], {TENANT})


def test_tokens_signed_by_another_key_or_missing_or_not_covering_a_tenant_are_refused() -> None:
    identity, stranger = Identity(), Identity()
    foreign = sandbox_token(stranger.signer, app_id=APP, tenant_id=TENANT, now=1_000_000.0)
    good = sandbox_token(identity.signer, app_id=APP, tenant_id=TENANT, now=1_000_000.0)
    tokens = checker(identity)
    assert not tokens.verify([foreign], {TENANT})
    assert not tokens.verify([good, foreign], {TENANT})       # every token must check out
    assert not tokens.verify([], {TENANT}) and not tokens.verify(None, {TENANT})
    assert not tokens.verify([good], {TENANT, "another tenant"})
    assert PUBLISHER_APP_ID == "0bf30f3b-4a52-48df-9a82-234910c4a086"


def _claims(body: str) -> dict[str, Any]:
    import json
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))
