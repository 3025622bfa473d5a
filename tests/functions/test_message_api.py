"""functions/message_api's own logic: the Content-Disposition of a downloaded attachment."""

from __future__ import annotations

import pytest

from functions.message_api import content_disposition


@pytest.mark.parametrize("name, ascii_part", [
    ("report.pdf", 'filename="report.pdf"'),
    ('evil"; filename="x.html', 'filename="evil_ filename=_x.html"'),
    ("a\r\nSet-Cookie: x=1", 'filename="a_Set-Cookie_ x=1"'),
    ("Résumé été.docx", 'filename="R_sum_ _t_.docx"'),
    ("../../etc/passwd", 'filename="_.._etc_passwd"'),
    ("", 'filename="attachment"'),
])
def test_the_name_cannot_break_the_header(name: str, ascii_part: str) -> None:
    header = content_disposition(name)
    assert header.startswith("attachment; ")
    assert ascii_part in header
    assert "\r" not in header and "\n" not in header
    assert header.count('"') == 2


def test_the_utf8_name_is_percent_encoded() -> None:
    assert content_disposition("Résumé.pdf").endswith("filename*=UTF-8''R%C3%A9sum%C3%A9.pdf")
