"""Token minting and validation for the sandbox identity platform.

Tokens are real JWTs signed with RS256 by a key generated when the sandbox
starts; its public half is published as a JWKS (``/{tenant}/discovery/v2.0/keys``)
like Entra ID does. Clients (MSAL, the product) treat access tokens as opaque,
as Microsoft asks; only the sandbox itself validates them.

Everything here is pure: no clock, no state. Callers pass ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Microsoft Graph's application id: the "aud" of v1.0 Graph access tokens.
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_AUDIENCES = frozenset({GRAPH_RESOURCE, GRAPH_RESOURCE + "/", GRAPH_APP_ID})


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url_encode`; raises ValueError on bad input."""
    if not isinstance(text, str) or any(c in text for c in "=+/ \n"):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc


def s256_challenge(verifier: str) -> str:
    """The PKCE S256 code_challenge for ``verifier`` (RFC 7636 §4.2)."""
    return b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())


def client_info(uid: str, utid: str) -> str:
    """Entra's ``client_info``: base64url JSON ``{"uid", "utid"}`` (MSAL builds home_account_id from it)."""
    return b64url_encode(json.dumps({"uid": uid, "utid": utid}, separators=(",", ":")).encode())


def opaque(nbytes: int = 48) -> str:
    """A random opaque token (authorization codes, refresh tokens)."""
    return secrets.token_urlsafe(nbytes)


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT without checking anything (tests and diagnostics)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    return json.loads(b64url_decode(parts[1]))


class InvalidToken(Exception):
    """A bearer token that must be refused; ``reason`` is one of
    ``malformed``, ``signature``, ``expired``, ``not_yet_valid``, ``audience``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TokenSigner:
    """Signs and verifies RS256 JWTs with one generated key.

    Verifying RSA on every Graph request is cheap but not free, so verified
    signatures are remembered (bounded); time and audience are checked on
    every call.
    """

    _CACHE_SIZE = 4096

    def __init__(self, key: rsa.RSAPrivateKey | None = None, kid: str | None = None) -> None:
        self._key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public = self._key.public_key()
        numbers = self._public.public_numbers()
        self._n = b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
        self._e = b64url_encode(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
        # Entra's kids are base64url thumbprint-like strings; ours is derived from the key.
        self.kid = kid or b64url_encode(hashlib.sha256(self._n.encode()).digest()[:20])
        self._verified: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def private_pem(self) -> bytes:
        """The signing key (PKCS#8 PEM), for the sandbox's saved state: tokens stay valid across restarts."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @classmethod
    def from_pem(cls, pem: bytes) -> TokenSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the saved signing key is not an RSA key")
        return cls(key)

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set that publishes the verification key."""
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
                          "n": self._n, "e": self._e}]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid, "x5t": self.kid}
        signing_input = (b64url_encode(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode()))
        signature = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url_encode(signature)

    def verify(self, token: str, *, now: float, audiences: Iterable[str] | None = None,
               leeway_s: float = 0.0) -> dict[str, Any]:
        """Return the claims of ``token`` or raise :class:`InvalidToken`."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify_signature(token)
            self._verified[token] = claims
            if len(self._verified) > self._CACHE_SIZE:
                self._verified.popitem(last=False)
        exp = claims.get("exp")
        nbf = claims.get("nbf", claims.get("iat", 0))
        if not isinstance(exp, int | float) or now >= exp + leeway_s:
            raise InvalidToken("expired", "Lifetime validation failed, the token is expired.")
        if isinstance(nbf, int | float) and now + leeway_s < nbf:
            raise InvalidToken("not_yet_valid", "Lifetime validation failed, the token is not yet valid.")
        if audiences is not None and claims.get("aud") not in set(audiences):
            raise InvalidToken("audience", "Access token validation failure. Invalid audience.")
        return claims

    def _verify_signature(self, token: str) -> dict[str, Any]:
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 3:
            # Graph's own wording for a token that is not a JWT at all.
            raise InvalidToken("malformed", "IDX14100: JWT is not well formed, there are no dots (.).")
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except ValueError as exc:
            raise InvalidToken("malformed", "IDX14102: Unable to decode the header or payload as Base64Url.") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise InvalidToken("malformed", "IDX14102: Unable to decode the header or payload as Base64Url.")
        if header.get("alg") != "RS256" or header.get("kid") != self.kid:
            raise InvalidToken("signature", "IDX10503: Signature validation failed.")
        try:
            self._public.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"),
                                padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature as exc:
            raise InvalidToken("signature", "IDX10511: Signature validation failed.") from exc
        return claims
