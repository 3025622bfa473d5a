"""Resource data in Outlook change notifications: our certificate, and the folder Graph encrypted for us.

Why (first): a ``me/messages`` notification names the message, not its folder, and
the engine syncs per folder. For the messages the store holds (read, flag,
delete) the store says where they are; new mail and a move's target are not
there yet, so the NOTIFIED job asked Graph, one ``GET
messages/{id}?$select=parentFolderId`` each: ~0.45 Graph requests per change
at the benchmark's mix, a third of all (docs/scaling.md). Outlook can put
the message's properties into the notification itself ("rich
notifications", documented for the ``message`` resource): the subscription
names them with ``$select`` (``me/messages?$select=parentFolderId``), sets
``includeResourceData`` and hands Graph a certificate; each notification
then carries ``encryptedContent`` that only our private key opens.

How Graph encrypts (Microsoft, "Set up change notifications that include
resource data"): a fresh symmetric key per notification; ``data`` is the
resource's JSON under AES-CBC with PKCS7 padding and the key's first 16
bytes as IV; ``dataKey`` is the key under our certificate's public key with
RSA-OAEP (SHA-1, MGF1); ``dataSignature`` is the HMAC-SHA256 of the
encrypted bytes under the key, checked *before* decrypting; the
``encryptionCertificateId`` we chose picks the private key. The HMAC proves
the data was not altered in transit, not who sent it (anyone holding the
public certificate can encrypt): authenticity comes from the notification's
signed clientState and the POST's validation tokens
(``mailsync.monitoring.validation_tokens``).

What the data is trusted for, once the POST's validation tokens and the
item's signed clientState passed and its ``dataSignature`` matched: the
folder of a ``created`` message decides *which folders to sync* (a wrong or
missing one costs what a basic notification costs: the job asks Graph);
and the whole selected state (``notified_message``) is shown on the page at
once and, over a message the store holds, written to the store
(``mailsync.monitoring.notified_states``), as a *provisional* copy. That is safe because of how it is written, not
because the data is assumed right: at the floor of its ``lastModified``
second, a version every delta reading of the same state (and every later
state) exceeds, so the NOTIFIED job's round, which still reads delta for
every notification, replaces it with delta's reading; it never overwrites
a newer stored state, keeps the stored body and resync epoch, and touches
only synced accounts and folders the store has. Delta stays the source of
truth: a notified state is what the page shows for about a second sooner.

Keys: ``NOTIFICATION_CERTIFICATES`` holds PEM blocks (or one line of base64
of them), private keys and certificates (RSA, 2,048-4,096 bits; self-signed is fine, Graph does not
check the issuer); each certificate is paired with the key of its public
half, the first certificate is current (new and renewed subscriptions get
it), the others stay listed until no notification names them any more
(rotation). A certificate's id is its SHA-1 thumbprint, so the id names the
key with no table. With no setting: in sandbox mode a development key and
certificate under ``MAILSYNC_LOCAL_DIR`` (created once, shared by the local
processes), against real Microsoft none (basic notifications, the lookups).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as symmetric_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from mailsync.errors import ConfigurationError, InputError, MailsyncError
from mailsync.models import Message
from mailsync.providers.graph import MESSAGE_FIELDS, map_message, notified_version
from mailsync.settings import Settings

log = logging.getLogger("mailsync.monitoring.resource_data")

# The message properties we ask Graph to put into notifications: what the list shows and the store keeps,
# everything ``map_message`` reads except ``id`` (always there) and the body (Graph refuses it in a
# subscription's $select). A subscription made with another $select is recreated at its renewal
# (mailsync.monitoring.subscriptions); until then its data names the folder only.
MESSAGE_SELECT = ",".join(name for name in MESSAGE_FIELDS if name != "id")
# The subscription's resource before the notified states: its data carries the folder alone.
FOLDER_ONLY_SELECT = "parentFolderId"
DEV_CERTIFICATE_FILE = "notification-certificate.pem"
MIN_KEY_BITS = 2048
MAX_KEY_BITS = 4096
MAX_DATA_CHARS = 64_000            # one message's selected properties: far smaller
# Graph ids (folders included) are base64 with these characters; anything else is not Graph.
GRAPH_ID = re.compile(r"^[A-Za-z0-9+/=_.:-]{1,512}$")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----", re.DOTALL)
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


@dataclass(frozen=True)
class NotificationKey:
    """One certificate Graph may encrypt with, and the private key that opens it."""

    certificate_id: str                  # our encryptionCertificateId: the certificate's SHA-1 thumbprint
    certificate: str                     # base64 DER, as Graph's encryptionCertificate takes it
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)   # the certificate names it


class NotificationKeys:
    """Our certificates for rich notifications; the first is current. Thread-safe (immutable)."""

    def __init__(self, keys: Sequence[NotificationKey]) -> None:
        if not keys:
            raise ConfigurationError("rich notifications need at least one certificate")
        self._keys = {key.certificate_id: key for key in keys}
        self.current = keys[0]

    def decrypt(self, content: Any) -> dict[str, Any]:
        """The resource Graph put into ``encryptedContent``; InputError when it cannot be trusted or read."""
        if not isinstance(content, Mapping):
            raise InputError("encryptedContent is not an object")
        key = self._keys.get(str(content.get("encryptionCertificateId")))
        if key is None:
            raise InputError("encryptedContent names a certificate we do not hold")
        data = _b64(content.get("data"), "data")
        if len(data) > MAX_DATA_CHARS:
            raise InputError("encryptedContent data is too large for a message's selected properties")
        try:
            symmetric = key.private_key.decrypt(_b64(content.get("dataKey"), "dataKey"), _OAEP)
        except ValueError as exc:
            raise InputError("encryptedContent dataKey does not open with our key") from exc
        if len(symmetric) not in (16, 24, 32):
            raise InputError("encryptedContent dataKey is not an AES key")
        # The signature first: nothing is decrypted that was altered on the way.
        expected = hmac.new(symmetric, data, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _b64(content.get("dataSignature"), "dataSignature")):
            raise InputError("encryptedContent dataSignature does not match its data")
        if not data or len(data) % 16:
            raise InputError("encryptedContent data is not whole AES blocks")
        decryptor = Cipher(algorithms.AES(symmetric), modes.CBC(symmetric[:16])).decryptor()
        unpadder = symmetric_padding.PKCS7(algorithms.AES.block_size).unpadder()
        try:
            plain = unpadder.update(decryptor.update(data) + decryptor.finalize()) + unpadder.finalize()
            resource = orjson.loads(plain)
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise InputError("encryptedContent data is not a JSON resource") from exc
        if not isinstance(resource, dict):
            raise InputError("encryptedContent data is not a JSON object")
        return resource


def parent_folder(resource: Mapping[str, Any], message_id: str) -> str | None:
    """The ``parentFolderId`` of a decrypted message resource, if it is about ``message_id`` and Graph-shaped.

    The resource names its message (``id``); one that names another message
    (content moved between items of a batch) says nothing about this one.
    """
    named = resource.get("id")
    if named is not None and named != message_id:
        return None
    folder = resource.get("parentFolderId")
    return folder if isinstance(folder, str) and GRAPH_ID.match(folder) else None


# What a resource must hold to be taken as the message's state: the selected properties every message has
# (a subscription made with an older, shorter $select carries the folder only). A draft may lack a sender,
# a sent time, a conversation or an internet message id: those may be absent.
_MAY_LACK = frozenset({"id", "from", "sentDateTime", "conversationId", "internetMessageId"})
_REQUIRED = tuple(name for name in MESSAGE_FIELDS if name not in _MAY_LACK)


def notified_message(resource: Mapping[str, Any], message_id: str, account_id: str) -> Message | None:
    """The message state a decrypted resource shows, at its notified version; None when it shows none.

    None for a resource about another message, one without every selected
    property (made under an older ``$select``: ``parent_folder`` still reads
    its folder) or with a value Graph would not send. The folder is its
    ``parentFolderId`` (a move's target); the body is not in it (Graph does
    not put it into notifications); the version is ``notified_version``
    (below delta's reading of the same state: ``mailsync.monitoring.notified_states``).
    """
    folder = parent_folder(resource, message_id)
    if folder is None or resource.get("id") != message_id or any(name not in resource for name in _REQUIRED):
        return None
    try:
        message = map_message(resource, account_id, folder)
    except (MailsyncError, AttributeError, TypeError, ValueError):
        return None                  # a timestamp, address or flag of a shape Graph does not send
    if message.modified_at is None or message.modified_at.tzinfo is None:
        return None
    return replace(message, version=notified_version(message.modified_at))


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InputError(f"encryptedContent has no {name}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"encryptedContent {name} is not base64") from exc


# -- configuration -------------------------------------------------------------------------


def parse_certificates(pem: str | bytes) -> list[NotificationKey]:
    """The keys in a PEM text of private keys and certificates, in the certificates' order.

    ConfigurationError for a certificate without its private key, a key that
    is not RSA of 2,048-4,096 bits, or no certificate at all.
    """
    raw = pem.encode("utf-8") if isinstance(pem, str) else pem
    if b"-----BEGIN" not in raw:
        # One line of base64 of the PEM: easier to carry in an environment variable or a CLI parameter.
        try:
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigurationError("NOTIFICATION_CERTIFICATES is neither PEM nor base64 of PEM") from exc
    private: list[rsa.RSAPrivateKey] = []
    certificates: list[x509.Certificate] = []
    for match in _PEM_BLOCK.finditer(raw):
        kind, block = match.group(1).decode("ascii"), match.group(0)
        try:
            if kind == "CERTIFICATE":
                certificates.append(x509.load_pem_x509_certificate(block))
            elif kind.endswith("PRIVATE KEY"):
                key = serialization.load_pem_private_key(block, password=None)
                if not isinstance(key, rsa.RSAPrivateKey):
                    raise ConfigurationError("NOTIFICATION_CERTIFICATES: Graph takes RSA keys only")
                private.append(key)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"NOTIFICATION_CERTIFICATES: a {kind} block cannot be read") from exc
    if not certificates:
        raise ConfigurationError("NOTIFICATION_CERTIFICATES holds no certificate")
    keys: list[NotificationKey] = []
    for certificate in certificates:
        public = certificate.public_key()
        if not isinstance(public, rsa.RSAPublicKey) or not MIN_KEY_BITS <= public.key_size <= MAX_KEY_BITS:
            raise ConfigurationError(f"NOTIFICATION_CERTIFICATES: Graph takes RSA keys of {MIN_KEY_BITS}-"
                                     f"{MAX_KEY_BITS} bits")
        numbers = public.public_numbers()
        pair = next((key for key in private if key.public_key().public_numbers() == numbers), None)
        if pair is None:
            raise ConfigurationError("NOTIFICATION_CERTIFICATES: a certificate has no private key beside it")
        der = certificate.public_bytes(serialization.Encoding.DER)
        keys.append(NotificationKey(hashlib.sha1(der).hexdigest().upper(),   # the thumbprint: an id, not a MAC
                                    base64.b64encode(der).decode("ascii"), pair))
    return keys


def load_notification_keys(settings: Settings) -> NotificationKeys | None:
    """The deployment's certificates: configured, a development one in sandbox mode, else None (no rich data)."""
    if settings.notification_certificates:
        return NotificationKeys(parse_certificates(settings.notification_certificates))
    if settings.uses_graph_sandbox:
        return NotificationKeys(parse_certificates(dev_certificate(Path(settings.local_dir))))
    return None


def dev_certificate(directory: Path) -> bytes:
    """The sandbox-only key and self-signed certificate under ``directory`` (PEM), created on first use.

    Atomic like the development secret key (``mailsync.security.crypto.dev_key``): written to a
    private temp file, then hard-linked into place, so processes starting together share one.
    """
    path = directory / DEV_CERTIFICATE_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{DEV_CERTIFICATE_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(new_certificate_pem("mailsync development notifications"))
        with contextlib.suppress(FileExistsError):   # another process won the race: use its certificate
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def new_certificate_pem(common_name: str, *, days: int = 3650) -> bytes:
    """A new RSA-2048 private key and a self-signed certificate for it, as PEM (Graph checks no issuer)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=days)).sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
            + certificate.public_bytes(serialization.Encoding.PEM))


if __name__ == "__main__":
    # `python -m mailsync.monitoring.resource_data` prints a new NOTIFICATION_CERTIFICATES value (one line:
    # base64 of the PEM key and certificate).
    print(base64.b64encode(new_certificate_pem("mailsync change notifications")).decode("ascii"))
