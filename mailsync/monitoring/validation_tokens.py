"""The ``validationTokens`` of a change notification POST that carries resource data.

Microsoft ("Set up change notifications that include resource data",
"Validating the authenticity of notifications"): before acting on resource
data, check every JWT in the POST's ``validationTokens`` (one per app and
tenant among its items):

1. not expired (and valid already);
2. signed by the Microsoft identity platform: RS256 under one of the keys it
   publishes (``mailsync.auth.published_keys``), issuer
   ``https://sts.windows.net/{tenant}/``;
3. issued for our app (``aud`` is our client id);
4. **issued by Microsoft Graph's change-notification publisher**: ``appid``
   ``0bf30f3b-4a52-48df-9a82-234910c4a086``.

Any failure makes the POST's resource data suspicious: it is ignored (the
notifications stay, authenticated by their signed clientState as always,
and their folders are looked up at Graph as before). Verified tokens are
remembered until they expire: Graph's POSTs for one app and tenant may carry
the same token, and an RSA check per POST is CPU the webhook need not spend.

"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from mailsync.auth.published_keys import SigningKeys, b64url_decode

PUBLISHER_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"   # Microsoft Graph's change-notification publisher
LEEWAY_S = 300.0               # clock skew allowed on exp / nbf
MAX_TOKENS = 10                # per POST: one per app and tenant pair, and we are one app
MAX_REMEMBERED = 1024

class ValidationTokens:
    """Checks a POST's validation tokens for our app (Microsoft's four rules, module docstring)."""

    def __init__(self, app_id: str, keys: SigningKeys, *, clock: Callable[[], float] = time.time) -> None:
        self._app_id = app_id
        self._keys = keys
        self._clock = clock
        self._lock = threading.Lock()
        self._verified: OrderedDict[str, tuple[float, float, str]] = OrderedDict()   # token -> (nbf, exp, tenant)

    def verify(self, tokens: Any, tenants: Collection[str]) -> bool:
        """True when ``tokens`` are all valid for our app and cover every tenant in ``tenants``."""
        if not isinstance(tokens, list) or not tokens or len(tokens) > MAX_TOKENS:
            return False
        covered: set[str] = set()
        now = self._clock()
        for token in tokens:
            tenant = self._tenant_of(token, now) if isinstance(token, str) else None
            if tenant is None:
                return False
            covered.add(tenant)
        return all(tenant in covered for tenant in tenants)

    def _tenant_of(self, token: str, now: float) -> str | None:
        """The tenant a valid token vouches for, or None."""
        with self._lock:
            known = self._verified.get(token)
        if known is None:
            known = self._check(token)
            if known is None:
                return None
            with self._lock:
                self._verified[token] = known
                while len(self._verified) > MAX_REMEMBERED:
                    self._verified.popitem(last=False)
        not_before, expires, tenant = known
        if now + LEEWAY_S < not_before or now - LEEWAY_S >= expires:
            return None
        return tenant

    def _check(self, token: str) -> tuple[float, float, str] | None:
        """(nbf, exp, tenant) of a token whose signature, issuer, audience and publisher are right; else None."""
        try:
            header_b64, claims_b64, signature_b64 = token.split(".")
            header = orjson.loads(b64url_decode(header_b64))
            claims = orjson.loads(b64url_decode(claims_b64))
            signature = b64url_decode(signature_b64)
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256" \
                or not isinstance(header.get("kid"), str):
            return None
        key = self._keys.get(header["kid"])
        if key is None:
            return None
        try:
            key.verify(signature, f"{header_b64}.{claims_b64}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return None
        tenant = claims.get("tid")
        expires, not_before = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(tenant, str) or claims.get("iss") != f"https://sts.windows.net/{tenant}/" \
                or claims.get("aud") != self._app_id or claims.get("appid") != PUBLISHER_APP_ID \
                or not isinstance(expires, int | float) or not isinstance(not_before, int | float):
            return None
        return float(not_before), float(expires), tenant
