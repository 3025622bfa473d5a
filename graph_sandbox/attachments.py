"""File attachments of sandbox messages: ``GET messages/{id}/attachments[/{id}[/$value]]``.

A seeded message with ``hasAttachments`` carries one to three
``fileAttachment``s generated from its body seed (a pure function, like its
body: a 100k-message mailbox stays small and survives a restart unchanged).
Kinds are what mail carries: a plain-text note, a CSV, a small PDF and an
inline PNG with a ``contentId`` (the HTML body's ``cid:`` picture).

Ids are derived from the message's immutable id and the attachment's
position, so they are stable across moves (Graph's attachment ids are
opaque; a client must only re-use ids it was given for the same message).
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from graph_sandbox.mailbox import Message, iso

ATTACHMENT_TYPE = "#microsoft.graph.fileAttachment"


@dataclass(frozen=True)
class Attachment:
    """One file attachment as Graph describes it (``content`` is the raw bytes)."""

    id: str
    name: str
    content_type: str
    content: bytes
    is_inline: bool
    content_id: str | None
    last_modified_ms: int

    @property
    def size(self) -> int:
        return len(self.content)


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid one-colour PNG (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def _pdf(text: str) -> bytes:
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode("latin-1", "replace")
    return (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
            b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
            b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R>>endobj\n"
            + f"4 0 obj<</Length {len(stream)}>>stream\n".encode() + stream
            + b"\nendstream endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def _attachment_id(message: Message, index: int) -> str:
    digest = hashlib.sha256(f"{message.immutable_id}/{index}".encode()).digest()[:24]
    return "AAMkAtt" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def attachments_of(message: Message) -> list[Attachment]:
    """The message's attachments (empty when ``hasAttachments`` is false)."""
    if not message.has_attachments:
        return []
    rng = random.Random(message.body_seed ^ 0x5A17)
    count = rng.choice((1, 1, 2, 3))
    kinds = rng.sample(("txt", "csv", "pdf", "png"), k=count)
    found: list[Attachment] = []
    for index, kind in enumerate(kinds):
        number = rng.randint(100, 999)
        if kind == "txt":
            name, ctype, content = f"notes-{number}.txt", "text/plain", \
                f"Notes for {message.subject}\r\nItem {number}.\r\n".encode()
            inline, cid = False, None
        elif kind == "csv":
            rows = "\r\n".join(f"{i},{rng.randint(1, 9999)}" for i in range(rng.randint(3, 40)))
            name, ctype, content = f"report-{number}.csv", "text/csv", f"line,value\r\n{rows}\r\n".encode()
            inline, cid = False, None
        elif kind == "pdf":
            name, ctype, content, inline, cid = f"invoice-{number}.pdf", "application/pdf", _pdf(f"Invoice {number}"), \
                False, None
        else:
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            name, ctype, content = f"image{number}.png", "image/png", _png(16, 16, colour)
            inline, cid = True, f"image{number}@sandbox"
        found.append(Attachment(id=_attachment_id(message, index), name=name, content_type=ctype, content=content,
                                is_inline=inline, content_id=cid, last_modified_ms=message.created_ms))
    return found


def attachment_of(message: Message, attachment_id: str) -> Attachment | None:
    for attachment in attachments_of(message):
        if attachment.id == attachment_id:
            return attachment
    return None


ATTACHMENT_FIELDS = ("id", "lastModifiedDateTime", "name", "contentType", "size", "isInline", "contentId",
                     "contentLocation", "contentBytes")


def attachment_json(attachment: Attachment, *, select: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A ``fileAttachment`` as Graph returns it (``contentBytes`` only when not left out by ``$select``)."""
    full: dict[str, Any] = {
        "id": attachment.id,
        "lastModifiedDateTime": iso(attachment.last_modified_ms),
        "name": attachment.name,
        "contentType": attachment.content_type,
        "size": attachment.size,
        "isInline": attachment.is_inline,
        "contentId": attachment.content_id,
        "contentLocation": None,
        "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
    }
    out: dict[str, Any] = {"@odata.type": ATTACHMENT_TYPE}
    if select is None:
        out.update(full)
    else:
        out["id"] = attachment.id
        out.update({name: full[name] for name in select})
    return out


def attachment_select(raw: str | None) -> tuple[str, ...] | None:
    """Canonical names of a ``$select`` on attachments; KeyError names the first unknown one."""
    if raw is None:
        return None
    lowered = {name.lower(): name for name in ATTACHMENT_FIELDS}
    out: list[str] = []
    for part in raw.split(","):
        name = part.strip()
        if not name:
            continue
        canonical = lowered.get(name.lower())
        if canonical is None:
            raise KeyError(name)
        if canonical not in out:
            out.append(canonical)
    return tuple(out)
