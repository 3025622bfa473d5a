"""Change notifications that include resource data ("rich notifications"), as Microsoft documents them.

Microsoft Graph's "Set up change notifications that include resource data"
and "Change notifications for Outlook resources" (learn.microsoft.com; the
microsoft-graph-docs-contrib sources ``concepts/change-notifications-with-resource-data.md``
and ``concepts/outlook-change-notifications-overview.md``) say, and the sandbox does:

* A subscription asks for it with ``includeResourceData: true``, an
  ``encryptionCertificate`` (a base64 X.509 certificate: only its public key
  is used, its issuer is not checked; the key must be RSA of 2,048 to 4,096
  bits) and an ``encryptionCertificateId`` (the app's own name for it, at
  most 128 characters). Outlook resources name the properties to include
  with ``$select`` in ``resource`` (``me/messages?$select=parentFolderId``);
  ``body`` / ``uniqueBody`` may not be selected. Such a subscription lives
  at most one day (1,440 minutes) instead of 4,230.
* Each change notification then carries ``encryptedContent``:

  - ``data``: the resource (the selected properties, as a GET returns them)
    as JSON, encrypted with AES in CBC mode, PKCS7 padding, under a fresh
    symmetric key per notification, whose first 16 bytes are the IV;
  - ``dataKey``: that key encrypted with the certificate's public key,
    RSA-OAEP with SHA-1 and MGF1 ("RSA/ECB/OAEPWithSHA1AndMGF1Padding");
  - ``dataSignature``: base64 HMAC-SHA256 of the encrypted ``data`` bytes
    under the symmetric key (check it before decrypting);
  - ``encryptionCertificateId`` and ``encryptionCertificateThumbprint``
    (hex SHA-1 of the certificate), to pick the private key.

* The POST body carries ``validationTokens``: one JWT per distinct (app,
  tenant) pair among its items, signed by the identity platform (RS256, its
  published keys), ``aud`` the subscribing app, ``iss``
  ``https://sts.windows.net/{tenant}/``, ``appid`` the change-notification
  publisher ``0bf30f3b-4a52-48df-9a82-234910c4a086``.

What Microsoft leaves open and the sandbox chooses: the symmetric key is
256 bits (AES-256: the documented JavaScript sample decrypts with
``aes-256-cbc``); a ``deleted`` notification carries no resource data (the
item is gone); a token lives one hour.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PUBLISHER_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"   # Microsoft Graph's change-notification publisher
MAX_RICH_MINUTES = 1440            # Outlook: a subscription with resource data lives at most a day
MAX_CERTIFICATE_ID = 128
MIN_KEY_BITS = 2048
MAX_KEY_BITS = 4096
TOKEN_LIFETIME_S = 3600
UNSELECTABLE = frozenset({"body", "uniquebody"})


class CertificateError(ValueError):
    """An ``encryptionCertificate`` Graph would refuse (the message says why)."""


@dataclass(frozen=True)
class EncryptionCertificate:
    """A subscription's certificate: only its public key and names are used."""

    certificate_id: str
    der: bytes

    @property
    def thumbprint(self) -> str:
        return hashlib.sha1(self.der).hexdigest().upper()

    @property
    def base64(self) -> str:
        return base64.b64encode(self.der).decode("ascii")

    def public_key(self) -> rsa.RSAPublicKey:
        key = x509.load_der_x509_certificate(self.der).public_key()
        assert isinstance(key, rsa.RSAPublicKey)   # checked by parse_certificate
        return key


def parse_certificate(encoded: Any, certificate_id: Any) -> EncryptionCertificate:
    """The subscription's ``encryptionCertificate`` / ``encryptionCertificateId``; CertificateError when unusable."""
    if not isinstance(encoded, str) or not encoded.strip():
        raise CertificateError("The 'encryptionCertificate' property is required when includeResourceData is true.")
    if not isinstance(certificate_id, str) or not certificate_id:
        raise CertificateError("The 'encryptionCertificateId' property is required when includeResourceData is true.")
    if len(certificate_id) > MAX_CERTIFICATE_ID:
        raise CertificateError(f"The 'encryptionCertificateId' property must not exceed {MAX_CERTIFICATE_ID} "
                               "characters.")
    try:
        der = base64.b64decode("".join(encoded.split()), validate=True)
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        raise CertificateError("The 'encryptionCertificate' property is not a base64-encoded X.509 "
                               "certificate.") from None
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError("The certificate's key must be of type RSA.")
    if not MIN_KEY_BITS <= key.key_size <= MAX_KEY_BITS:
        raise CertificateError(f"The certificate's key size must be between {MIN_KEY_BITS} and {MAX_KEY_BITS} "
                               "bits.")
    return EncryptionCertificate(certificate_id, der)


def encrypted_content(resource: dict[str, Any], certificate: EncryptionCertificate) -> dict[str, Any]:
    """``encryptedContent`` for one notification: ``resource`` as JSON, under a fresh key for ``certificate``."""
    key = os.urandom(32)
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    plain = padder.update(json.dumps(resource, separators=(",", ":")).encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    data = encryptor.update(plain) + encryptor.finalize()
    data_key = certificate.public_key().encrypt(key, asymmetric_padding.OAEP(
        mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    return {
        "data": base64.b64encode(data).decode("ascii"),
        "dataSignature": base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode("ascii"),
        "dataKey": base64.b64encode(data_key).decode("ascii"),
        "encryptionCertificateId": certificate.certificate_id,
        "encryptionCertificateThumbprint": certificate.thumbprint,
    }


class ClaimsSigner(Protocol):
    def sign(self, claims: dict[str, Any]) -> str:
        ...


def validation_token(signer: ClaimsSigner, *, app_id: str, tenant_id: str, now: float) -> str:
    """One ``validationTokens`` entry: the identity platform vouching that Graph sent this to ``app_id``."""
    issued = int(now)
    issuer = f"https://sts.windows.net/{tenant_id}/"
    return signer.sign({
        "aud": app_id, "iss": issuer, "iat": issued, "nbf": issued, "exp": issued + TOKEN_LIFETIME_S,
        "appid": PUBLISHER_APP_ID, "appidacr": "2", "idp": issuer, "tid": tenant_id,
        "uti": base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii"), "ver": "1.0",
    })
