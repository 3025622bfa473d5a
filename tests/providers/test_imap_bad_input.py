"""Odd mail on a real Dovecot never breaks a page: 8-bit and mislabelled subjects, giant and broken headers.

Each message is APPENDed as raw bytes (what a sloppy or hostile sender's
mail looks like after delivery), then the folder is synced in small pages.
Every page must go through, every message must become a record with the
best readable text, and nothing may be lost.
"""

from __future__ import annotations

import base64

import pytest

from mailsync.providers.imap_mapping import MAX_ADDRESSES, MAX_SUBJECT_CHARS, PREVIEW_CHARS
from tests.fixtures.dovecot import DovecotServer
from tests.providers.contract import Mirror
from tests.providers.imap_harness import ImapHarness, make_harness

ODD: dict[str, bytes] = {
    "latin1": b"Subject: Gr\xfc\xdfe aus K\xf6ln\r\nFrom: M\xfcller <m@x.de>\r\n\r\nK\xf6ln\r\n",
    "utf8-raw": "Subject: naïve café ☕\r\nFrom: a@x.org\r\n\r\nbody\r\n".encode(),
    "rfc2047-mixed": b"Subject: =?iso-2022-jp?b?GyRCJEokcyQrGyhC?= and =?koi8-r?q?=F0=D2=C9=D7=C5=D4?=\r\n\r\nx\r\n",
    "unknown-charset": b"Subject: =?x-martian?q?zork?=\r\nContent-Type: text/plain; charset=x-martian\r\n\r\nzork\r\n",
    "broken-word": b"Subject: =?utf-8?b?###?= tail\r\n\r\nx\r\n",
    "no-headers": b"\r\njust a body, no header at all\r\n",
    "garbage-lines": b"this is not a header\r\n: neither is this\r\nSubject: still found\r\n\r\nx\r\n",
    "bad-date": b"Subject: bad date\r\nDate: 32 Foo 99999 25:61:61 +9999\r\n\r\nx\r\n",
    "huge-subject": b"Subject: " + b"A" * 300_000 + b"\r\n\r\nx\r\n",
    "many-recipients": b"Subject: many\r\nTo: " + b", ".join(b"r%d@x.org" % n for n in range(6000)) + b"\r\n\r\nx\r\n",
    "huge-header": b"Subject: big header\r\nX-Junk: " + (b"j" * 998 + b"\r\n ") * 1500 + b"end\r\n\r\nx\r\n",
    "broken-mime": (b"Subject: broken mime\r\nContent-Type: multipart/mixed; boundary=\"never\"\r\n\r\n"
                    b"--other\r\nContent-Type: text/plain\r\n\r\nlost\r\n"),
    "bad-base64": (b"Subject: bad base64\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\n@@@@not base64!!!\r\n"),
    "html-only": (b"Subject: html\r\nContent-Type: text/html; charset=windows-1252\r\n\r\n"
                  b"<html><body><p>Caf\xe9 &amp; more</p></body></html>\r\n"),
    "base64-utf16": (b"Subject: utf16\r\nContent-Type: text/plain; charset=utf-16\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n"
                     + base64.b64encode("hello from utf-16".encode("utf-16")) + b"\r\n"),
}
EXPECTED_SUBJECTS = {
    "latin1": "Grüße aus Köln", "utf8-raw": "naïve café ☕", "rfc2047-mixed": "なんか and Привет",
    "unknown-charset": "zork", "broken-word": "=?utf-8?b?###?= tail", "no-headers": "",
    "garbage-lines": "still found", "bad-date": "bad date", "huge-subject": "A" * MAX_SUBJECT_CHARS,
    "many-recipients": "many", "huge-header": "big header", "broken-mime": "broken mime", "bad-base64": "bad base64",
    "html-only": "html", "base64-utf16": "utf16",
}


@pytest.fixture(scope="module")
def odd_harness(dovecot: DovecotServer) -> ImapHarness:
    harness = make_harness(dovecot, folders={"INBOX": 2})
    with harness.client() as client:
        client.create_folder("Odd")
        for raw in ODD.values():
            client.append("Odd", raw)
    return harness


def test_every_odd_message_syncs_in_small_pages(odd_harness: ImapHarness) -> None:
    provider = odd_harness.open(page_size=2)
    mirror = Mirror()
    mirror.sync(provider)
    odd = sorted((m for m in mirror.messages.values() if m.folder_id == "Odd"),
                 key=lambda m: int(m.message_id.rsplit(".", 1)[1]))
    assert [m.subject for m in odd] == [EXPECTED_SUBJECTS[name] for name in ODD]
    by_name = dict(zip(ODD, odd, strict=True))
    assert by_name["latin1"].sender is not None and by_name["latin1"].sender.name == "Müller"
    assert by_name["no-headers"].sender is None and by_name["no-headers"].body_preview.startswith("just a body")
    assert by_name["bad-date"].sent_at is None and by_name["bad-date"].received_at is not None
    assert len(by_name["many-recipients"].to) == MAX_ADDRESSES
    assert by_name["broken-mime"].body_preview == ""
    assert by_name["html-only"].body_preview == "Café & more"
    assert by_name["base64-utf16"].body_preview == "hello from utf-16"
    assert all(len(m.body_preview) <= PREVIEW_CHARS for m in odd)


def test_odd_mail_goes_through_the_real_store(odd_harness: ImapHarness, make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    provider = odd_harness.open(page_size=500)
    messages = provider.message_changes("Odd", None).upserts
    result = store.upsert_messages(messages, epoch=1)
    assert result.written == len(ODD) and not result.failed_ids
    store.refresh()
    back = {m.message_id: m for m in (store.get_message(odd_harness.account_id, m.message_id) for m in messages) if m}
    assert {m.message_id: m.subject for m in messages} == {mid: m.subject for mid, m in back.items()}
